//! The node: the registry of Thing actors and the background tasks around it, the idle
//! sweeper, the deadline timer and the outbox keeper (the effects consumer of the change
//! feed), plus whatever background tasks the frontends hand it. One [`Node::shutdown`] stops
//! them in order and syncs storage once.
//!
//! Start-up: the registry starts, then every change whose effects were not handled before the
//! last stop is delivered again ([`recover_at_start`]), then the background tasks start; the
//! caller opens its listeners after [`Node::start`] returns.
//!
//! Shutdown: the frontends stop first (the caller), then the sweeper, the timer and the
//! frontends' tasks, then the keeper runs its last round (recovering stragglers, storing the
//! sink's state and moving the cursor), then every Thing passivates (writing its snapshot), then
//! one sync.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use thinghub_storage::{FeedEntry, Store};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::context::ThingContext;
use crate::deadlines::{self, DeadlineConfig};
use crate::outbox::{Outbox, OutboxConfig, CONSUMER};
use crate::registry::{Registry, RegistryConfig};
use crate::thing_actor::Request;

/// How the node runs.
#[derive(Debug, Clone, Copy, Default)]
pub struct NodeConfig {
    /// The registry.
    pub registry: RegistryConfig,
    /// The deadline timer.
    pub deadlines: DeadlineConfig,
    /// The outbox keeper.
    pub outbox: OutboxConfig,
}

/// A background task and how to stop it.
struct Task {
    name: &'static str,
    handle: JoinHandle<()>,
}

/// The node.
pub struct Node {
    registry: Registry,
    outbox: Arc<Outbox>,
    /// Stops the sweeper, the timer and the frontends' tasks.
    stop: watch::Sender<bool>,
    tasks: Vec<Task>,
    /// Stops the keeper (after the Things).
    keeper_stop: watch::Sender<bool>,
    keeper: Task,
}

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
#[error("actor system: {0}")]
pub struct NodeError(String);

impl Node {
    /// Starts the registry over `context`, delivers what the change feed still owes, and starts
    /// the background tasks.
    pub async fn start(context: Arc<ThingContext>, config: NodeConfig) -> Result<Node, NodeError> {
        let outbox = context.outbox.clone();
        let registry = Registry::start(context, config.registry)
            .await
            .map_err(|e| NodeError(e.to_string()))?;
        let saved = recover_at_start(&registry, &outbox, &config.outbox).await;
        let (stop, stop_rx) = watch::channel(false);
        let (keeper_stop, keeper_rx) = watch::channel(false);
        let keeper = Task {
            name: "outbox keeper",
            handle: tokio::spawn(run_keeper(
                registry.clone(),
                outbox.clone(),
                config.outbox,
                saved,
                keeper_rx,
            )),
        };
        let mut node = Node {
            registry: registry.clone(),
            outbox,
            stop,
            tasks: Vec::new(),
            keeper_stop,
            keeper,
        };
        node.tasks.push(Task {
            name: "idle sweeper",
            handle: tokio::spawn(registry.clone().run_sweeper(stop_rx.clone())),
        });
        node.tasks.push(Task {
            name: "deadline timer",
            handle: tokio::spawn(deadlines::run(registry, config.deadlines, stop_rx)),
        });
        Ok(node)
    }

    /// The registry.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The outbox.
    pub fn outbox(&self) -> &Arc<Outbox> {
        &self.outbox
    }

    /// Runs a frontend's background task until shutdown: `task` gets the stop signal.
    pub fn spawn<F>(&mut self, name: &'static str, task: impl FnOnce(watch::Receiver<bool>) -> F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let handle = tokio::spawn(task(self.stop.subscribe()));
        self.tasks.push(Task { name, handle });
    }

    /// Stops everything (see the module doc) within about `wait`, then syncs storage once.
    pub async fn shutdown(self, wait: Duration) -> Result<(), thinghub_storage::StorageError> {
        let _ = self.stop.send(true);
        for task in self.tasks {
            finish(task, wait).await;
        }
        // The keeper's last round still needs the Things (to recover a straggler).
        let _ = self.keeper_stop.send(true);
        finish(self.keeper, wait).await;
        self.registry.shutdown(wait).await;
        self.registry.context().store.sync().await
    }
}

/// Waits (bounded) for a stopped task.
async fn finish(task: Task, wait: Duration) {
    let name = task.name;
    let abort = task.handle.abort_handle();
    match tokio::time::timeout(wait, task.handle).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::error!(task = name, error = %e, "a background task failed"),
        Err(_) => {
            tracing::warn!(
                task = name,
                "a background task did not stop in time; aborted"
            );
            abort.abort();
        }
    }
}

/// Keeps the outbox's cursor until `stop` resolves: recovers what is due, checkpoints the sink,
/// saves the cursor, trims the feed. One more round runs at stop.
async fn run_keeper(
    registry: Registry,
    outbox: Arc<Outbox>,
    config: OutboxConfig,
    mut saved: u64,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let hurry = outbox.sink.hurry();
    loop {
        let stopping = tokio::select! {
            _ = tokio::time::sleep(config.checkpoint_interval) => false,
            _ = hurry.notified() => false,
            _ = stop.wait_for(|s| *s) => true,
        };
        saved = round(&registry, &outbox, &config, saved).await;
        if stopping {
            return;
        }
    }
}

/// Delivers again the effects of every change made before this process started and not
/// handled then (a crash between commits and their publication), before frontends accept
/// anyone. Returns the cursor as saved.
pub async fn recover_at_start(registry: &Registry, outbox: &Outbox, config: &OutboxConfig) -> u64 {
    let mut saved = outbox.handled_through();
    let owed = outbox.started_at.saturating_sub(1).saturating_sub(saved);
    if owed > 0 {
        tracing::info!(
            changes = owed,
            cursor = saved,
            "delivering again the effects of changes made before the restart"
        );
    }
    while outbox.handled_through().saturating_add(1) < outbox.started_at {
        let before = outbox.handled_through();
        saved = round(registry, outbox, config, saved).await;
        if outbox.handled_through() == before {
            // Things too busy to answer: give them a round's time.
            tokio::time::sleep(config.checkpoint_interval).await;
        }
    }
    if owed > 0 {
        tracing::info!(
            recovered = outbox.stats.recovered.load(Ordering::Relaxed),
            "effects of earlier changes delivered again"
        );
    }
    saved
}

/// One round of the keeper; returns the cursor as saved now.
pub async fn round(registry: &Registry, outbox: &Outbox, config: &OutboxConfig, saved: u64) -> u64 {
    let store = &registry.context().store;
    recover(registry, store, outbox, config).await;
    // Read before the checkpoint: everything delivered up to it is in what gets written.
    let through = outbox.handled_through();
    let wrote = match checkpoint(outbox) {
        Ok(wrote) => wrote,
        Err(e) => {
            tracing::error!(error = %e, "the effect sink could not checkpoint; the cursor stays");
            return saved;
        }
    };
    if !wrote && through == saved && !outbox.sink.unsynced() {
        return saved;
    }
    // The sink's side durable first: the cursor never passes an effect a crash could lose.
    if let Err(e) = store.sync().await {
        tracing::error!(error = %e, "cannot make the effect sink's state durable; the cursor stays");
        return saved;
    }
    outbox.sink.synced();
    if wrote {
        outbox
            .stats
            .sink_writes_synced
            .fetch_add(1, Ordering::Relaxed);
    }
    if through == saved {
        return saved;
    }
    match store.set_cursor(CONSUMER, through) {
        Ok(()) => {
            outbox.stats.checkpoints.fetch_add(1, Ordering::Relaxed);
            if let Err(e) = store.trim_feed(config.trim_batch_max) {
                tracing::warn!(error = %e, "cannot trim the change feed");
            }
            through
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot save the effects cursor");
            saved
        }
    }
}

/// Asks the Things of the positions due for recovery to deliver again what they owe.
async fn recover(registry: &Registry, store: &Store, outbox: &Outbox, config: &OutboxConfig) {
    let end = store.feed_durable_end();
    let due = outbox.due(end, config.straggler_grace, config.recover_batch_max);
    let Some(&first) = due.first() else {
        return;
    };
    let limit = config.recover_batch_max.saturating_mul(2).max(1);
    let entries = match store.read_feed(first - 1, limit) {
        Ok(entries) => entries,
        Err(e) => {
            tracing::error!(error = %e, "cannot read the change feed");
            return;
        }
    };
    // Positions beyond what this read covered are left for the next round.
    let covered_to = match entries.last() {
        Some(last) if entries.len() >= limit => last.position,
        _ => u64::MAX,
    };
    let due: Vec<u64> = due.into_iter().filter(|p| *p <= covered_to).collect();
    let due: BTreeSet<u64> = due.into_iter().collect();
    // One request per Thing for the whole range of its due entries.
    let mut by_thing: BTreeMap<String, (u64, u64, Vec<u64>)> = BTreeMap::new();
    let mut present = BTreeSet::new();
    for FeedEntry {
        position,
        thing,
        first_seq,
        count,
    } in entries.into_iter().filter(|e| due.contains(&e.position))
    {
        present.insert(position);
        let last_seq = first_seq.saturating_add(u64::from(count.max(1)) - 1);
        let range = by_thing
            .entry(thing)
            .or_insert((first_seq, last_seq, Vec::new()));
        range.0 = range.0.min(first_seq);
        range.1 = range.1.max(last_seq);
        range.2.push(position);
    }
    // A due position without an entry was trimmed or never written: nothing to deliver.
    for position in due.iter().filter(|p| !present.contains(p)) {
        outbox.mark(*position);
    }
    for (thing, (first_seq, last_seq, positions)) in by_thing {
        let request = Request::Redeliver {
            first_seq,
            last_seq,
        };
        let answer = registry.ask(&thing, request).await;
        let mut failures = outbox
            .recover_failures
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        match answer {
            Ok(_) => {
                failures.remove(&thing);
                outbox
                    .stats
                    .recovered
                    .fetch_add(positions.len() as u64, Ordering::Relaxed);
            }
            Err(rejection) => {
                let attempts = failures.entry(thing.clone()).or_insert(0);
                *attempts += 1;
                if *attempts < config.recover_attempts_max {
                    // Not handled: the next round asks again.
                    tracing::warn!(%thing, first_seq, last_seq, attempt = *attempts, error = %rejection.message, "effects of these events not delivered again yet");
                    continue;
                }
                // A Thing that keeps failing (its log unreadable, say) must not hold every
                // other Thing's effects behind it for good.
                failures.remove(&thing);
                outbox
                    .stats
                    .abandoned
                    .fetch_add(positions.len() as u64, Ordering::Relaxed);
                tracing::error!(%thing, first_seq, last_seq, attempts = config.recover_attempts_max, error = %rejection.message, "effects of these events given up: they may never have reached anyone");
            }
        }
        drop(failures);
        for position in positions {
            outbox.mark(position);
        }
    }
}

/// The sink's checkpoint (failing on purpose under fault injection).
fn checkpoint(outbox: &Outbox) -> Result<bool, String> {
    #[cfg(feature = "test-util")]
    if crate::fault::sink_checkpoint_fails() {
        return Err("fault injection: the sink's checkpoints fail".into());
    }
    outbox.sink.checkpoint()
}
