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
use std::time::{Duration, Instant};

use thinghub_storage::{FeedEntry, Store};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::context::ThingContext;
use crate::deadlines::{self, DeadlineConfig};
use crate::outbox::{Outbox, OutboxConfig, Recovering, CONSUMER};
use crate::registry::{Registry, RegistryConfig};
use crate::thing::RejectionKind;
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
    /// Stops the keeper (after the other tasks, before the Things passivate).
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
/// anyone. Returns the cursor as saved. If recovery makes no progress for `straggler_grace`
/// (a Thing that keeps failing), start-up goes on and the keeper keeps trying.
pub async fn recover_at_start(
    registry: &Registry,
    outbox: &Arc<Outbox>,
    config: &OutboxConfig,
) -> u64 {
    let mut saved = outbox.handled_through();
    let owed = outbox.started_at.saturating_sub(1).saturating_sub(saved);
    if owed > 0 {
        tracing::info!(
            changes = owed,
            cursor = saved,
            "delivering again the effects of changes made before the restart"
        );
    }
    let mut progress_at = tokio::time::Instant::now();
    while outbox.handled_through().saturating_add(1) < outbox.started_at {
        let before = outbox.handled_through();
        saved = round(registry, outbox, config, saved).await;
        if outbox.handled_through() != before {
            progress_at = tokio::time::Instant::now();
            continue;
        }
        if progress_at.elapsed() >= config.straggler_grace {
            tracing::warn!(
                owed = outbox.started_at.saturating_sub(1).saturating_sub(outbox.handled_through()),
                "recovery of earlier changes makes no progress; serving meanwhile, the keeper keeps trying"
            );
            break;
        }
        // Answers still out, or Things waiting to be asked again: until an answer, or a round's
        // time.
        tokio::select! {
            () = outbox.recovered.notified() => {}
            () = tokio::time::sleep(config.checkpoint_interval) => {}
        }
    }
    if outbox.handled_through() != saved {
        // What the last answers delivered: stored and passed by the cursor.
        saved = round(registry, outbox, config, saved).await;
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
pub async fn round(
    registry: &Registry,
    outbox: &Arc<Outbox>,
    config: &OutboxConfig,
    saved: u64,
) -> u64 {
    let store = &registry.context().store;
    recover(registry, store, outbox, config);
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

/// Asks the Things of the positions due for recovery to deliver again what they owe: one
/// request per Thing at a time, each in its own task, so a slow or wedged Thing delays neither
/// the others nor the checkpoint (which persistent SUBACKs wait for).
fn recover(registry: &Registry, store: &Store, outbox: &Arc<Outbox>, config: &OutboxConfig) {
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
    let now = Instant::now();
    for (thing, (first_seq, last_seq, positions)) in by_thing {
        {
            let mut recovering = outbox.recovering();
            let state = recovering.entry(thing.clone()).or_insert(Recovering {
                attempts: 0,
                in_flight: false,
                next_try: now,
            });
            if state.in_flight || state.next_try > now {
                continue;
            }
            state.in_flight = true;
        }
        tokio::spawn(redeliver(
            registry.clone(),
            outbox.clone(),
            *config,
            thing,
            (first_seq, last_seq),
            positions,
        ));
    }
}

/// Asks `thing` to deliver again what it owes for its events `seqs`, then marks `positions`
/// handled, or schedules the next attempt, or gives them up after `recover_attempts_max`
/// failures in a row.
async fn redeliver(
    registry: Registry,
    outbox: Arc<Outbox>,
    config: OutboxConfig,
    thing: String,
    (first_seq, last_seq): (u64, u64),
    positions: Vec<u64>,
) {
    let answer = registry
        .ask(
            &thing,
            Request::Redeliver {
                first_seq,
                last_seq,
            },
        )
        .await;
    let n = positions.len() as u64;
    {
        let mut recovering = outbox.recovering();
        match answer {
            Ok(_) => {
                recovering.remove(&thing);
                outbox.stats.recovered.fetch_add(n, Ordering::Relaxed);
            }
            Err(rejection) => {
                let state = recovering.entry(thing.clone()).or_insert(Recovering {
                    attempts: 0,
                    in_flight: false,
                    next_try: Instant::now(),
                });
                state.in_flight = false;
                if rejection.kind != RejectionKind::Timeout {
                    state.attempts += 1;
                }
                if state.attempts < config.recover_attempts_max {
                    // Not handled: asked again after a wait that doubles with each failure.
                    let backoff = config
                        .checkpoint_interval
                        .saturating_mul(1 << state.attempts.saturating_add(1).min(8));
                    state.next_try = Instant::now() + backoff;
                    tracing::warn!(%thing, first_seq, last_seq, attempt = state.attempts, retry_in_ms = backoff.as_millis() as u64, error = %rejection.message, "effects of these events not delivered again yet");
                    return;
                }
                // A Thing that keeps failing (its log unreadable, say) must not hold every
                // other Thing's effects behind it for good.
                recovering.remove(&thing);
                outbox.stats.abandoned.fetch_add(n, Ordering::Relaxed);
                tracing::error!(%thing, first_seq, last_seq, attempts = config.recover_attempts_max, error = %rejection.message, "effects of these events given up: they may never have reached anyone");
            }
        }
    }
    for position in positions {
        outbox.mark(position);
    }
    outbox.recovered.notify_one();
}

/// The sink's checkpoint (failing on purpose under fault injection).
fn checkpoint(outbox: &Outbox) -> Result<bool, String> {
    #[cfg(feature = "test-util")]
    if crate::fault::sink_checkpoint_fails() {
        return Err("fault injection: the sink's checkpoints fail".into());
    }
    outbox.sink.checkpoint()
}
