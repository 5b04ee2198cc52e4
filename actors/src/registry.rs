//! The registry: thing name -> the one live actor of that Thing, with activation, passivation
//! and supervision.
//!
//! It is sharded by a hash of the name. Each shard is a mutex-guarded map (routing is a lock and
//! a channel send, no router actor in the path) plus a supervisor actor that every Thing actor of
//! the shard is linked to.
//!
//! A slot moves `Starting -> Active -> Stopping -> (removed | Starting)`:
//! - **Activation:** the first request for an absent Thing inserts `Starting` (buffering
//!   requests) and spawns the actor in a task; the actor replays in `post_start`.
//! - **Passivation handshake:** the sweeper marks an idle `Active` slot `Stopping` and sends
//!   `Passivate` *under the shard lock*, so `Passivate` is the last message that incarnation ever
//!   gets and every request routed before it is handled first. Requests arriving while `Stopping`
//!   are buffered; when the supervisor sees the actor terminate, they start the next incarnation.
//!   So two incarnations never overlap (no two writers for one log) and no request is lost.
//! - **Supervision:** an actor that dies unexpectedly (a panic outside the domain guard) is
//!   removed; the request it was handling (and any queued behind it) get an internal error, and
//!   the next request re-activates the Thing from storage.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use ractor::{Actor, ActorCell, ActorId, ActorProcessingErr, ActorRef, SupervisionEvent};
use tokio::sync::oneshot;

use crate::context::DeadlineStats;
use crate::context::ThingContext;
use crate::thing::{Rejection, RejectionKind};
use crate::thing_actor::{Request, Response, ThingActor, ThingArgs, ThingMsg};

/// Registry bounds and timings.
#[derive(Debug, Clone, Copy)]
pub struct RegistryConfig {
    /// Number of shards (each a map + a supervisor actor).
    pub shards: usize,
    /// A Thing with no request for this long is passivated.
    pub thing_idle_ms: u64,
    /// How long a caller waits for a Thing's answer before giving up with 503.
    pub request_timeout_ms: u64,
    /// Requests one Thing may have in flight; more are refused at once with 429.
    pub requests_in_flight_max: u32,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        RegistryConfig {
            shards: 64,
            thing_idle_ms: 60_000,
            request_timeout_ms: 10_000,
            requests_in_flight_max: 10,
        }
    }
}

/// Counters since start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RegistryStats {
    /// Thing actors alive now (active or stopping).
    pub active_things: u64,
    /// Actors spawned.
    pub activations: u64,
    /// Actors passivated after idling.
    pub passivations: u64,
    /// Actors that died unexpectedly (supervisor restarts).
    pub failures: u64,
}

enum Slot {
    /// Spawning; requests wait here.
    Starting { buffered: Vec<ThingMsg> },
    /// Live.
    Active {
        actor: ActorRef<ThingMsg>,
        last_routed: Instant,
    },
    /// Told to stop (or found dead); requests wait for the termination to start the next one.
    Stopping {
        actor: ActorId,
        buffered: Vec<ThingMsg>,
    },
}

#[derive(Default)]
struct ShardMap {
    slots: HashMap<String, Slot>,
    names: HashMap<ActorId, String>,
    /// Requests in flight per Thing (absent = 0).
    in_flight: HashMap<String, u32>,
}

/// Holds one of a Thing's in-flight places; gives it back when dropped (even if the caller
/// stops waiting), so a cancelled request cannot leak a place.
struct InFlight<'r> {
    registry: &'r Registry,
    shard: usize,
    name: &'r str,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        let mut map = lock(&self.registry.inner.shards[self.shard]);
        if let Some(count) = map.in_flight.get_mut(self.name) {
            *count -= 1;
            if *count == 0 {
                map.in_flight.remove(self.name);
            }
        }
    }
}

struct Shard {
    map: Mutex<ShardMap>,
    supervisor: ActorCell,
}

pub(crate) struct Inner {
    shards: Vec<Shard>,
    context: Arc<ThingContext>,
    config: RegistryConfig,
    activations: AtomicU64,
    passivations: AtomicU64,
    failures: AtomicU64,
    alive: AtomicU64,
}

/// Routes requests to Thing actors. Cheap to clone.
#[derive(Clone)]
pub struct Registry {
    inner: Arc<Inner>,
}

struct ShardSupervisor;

struct SupervisorArgs {
    registry: Arc<std::sync::OnceLock<Weak<Inner>>>,
    shard: usize,
}

impl Actor for ShardSupervisor {
    type Msg = ();
    type State = SupervisorArgs;
    type Arguments = SupervisorArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<()>,
        args: SupervisorArgs,
    ) -> Result<SupervisorArgs, ActorProcessingErr> {
        Ok(args)
    }

    async fn handle_supervisor_evt(
        &self,
        _myself: ActorRef<()>,
        event: SupervisionEvent,
        state: &mut SupervisorArgs,
    ) -> Result<(), ActorProcessingErr> {
        let Some(inner) = state.registry.get().and_then(Weak::upgrade) else {
            return Ok(());
        };
        let registry = Registry { inner };
        match event {
            SupervisionEvent::ActorTerminated(cell, _, reason) => {
                registry.on_terminated(state.shard, cell.get_id(), reason.as_deref(), None);
            }
            SupervisionEvent::ActorFailed(cell, error) => {
                registry.on_terminated(state.shard, cell.get_id(), None, Some(error.to_string()));
            }
            _ => {}
        }
        Ok(())
    }
}

fn lock(shard: &Shard) -> MutexGuard<'_, ShardMap> {
    shard.map.lock().unwrap_or_else(|p| p.into_inner())
}

impl Registry {
    /// Starts the registry (its shard supervisors and the passivation sweeper).
    pub async fn start(
        context: Arc<ThingContext>,
        config: RegistryConfig,
    ) -> Result<Registry, ActorProcessingErr> {
        let handle: Arc<std::sync::OnceLock<Weak<Inner>>> = Arc::new(std::sync::OnceLock::new());
        let mut shards = Vec::with_capacity(config.shards.max(1));
        for shard in 0..config.shards.max(1) {
            let (supervisor, _) = Actor::spawn(
                None,
                ShardSupervisor,
                SupervisorArgs {
                    registry: handle.clone(),
                    shard,
                },
            )
            .await?;
            shards.push(Shard {
                map: Mutex::new(ShardMap::default()),
                supervisor: supervisor.get_cell(),
            });
        }
        let inner = Arc::new(Inner {
            shards,
            context,
            config,
            activations: AtomicU64::new(0),
            passivations: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            alive: AtomicU64::new(0),
        });
        let _ = handle.set(Arc::downgrade(&inner));
        Ok(Registry { inner })
    }

    /// The deadline timer's counters.
    pub fn deadline_stats(&self) -> DeadlineStats {
        self.inner.context.deadlines.stats()
    }

    /// The shared context (store, clock, limits).
    pub fn context(&self) -> &Arc<ThingContext> {
        &self.inner.context
    }

    /// Sends `request` to the Thing `name` (activating it if needed) and awaits the answer.
    /// 429 when the Thing already has `requests_in_flight_max` requests in flight.
    pub async fn request(&self, name: &str, request: Request) -> Result<Response, Rejection> {
        let (reply, answer) = oneshot::channel();
        let _place = self.admit_and_route(name, ThingMsg::Request { request, reply })?;
        self.answer(name, answer).await
    }

    /// Sends `request` without taking one of the Thing's request places: for the node's own
    /// background work (one request per Thing at a time), which must not be refused because
    /// clients keep the Thing busy.
    pub(crate) async fn ask(&self, name: &str, request: Request) -> Result<Response, Rejection> {
        let (reply, answer) = oneshot::channel();
        self.route(name, ThingMsg::Request { request, reply });
        self.answer(name, answer).await
    }

    /// The Thing's answer to a routed request, or why there is none.
    async fn answer(
        &self,
        name: &str,
        answer: oneshot::Receiver<Result<Response, Rejection>>,
    ) -> Result<Response, Rejection> {
        let timeout = Duration::from_millis(self.inner.config.request_timeout_ms);
        match tokio::time::timeout(timeout, answer).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(_)) => Err(Rejection::new(
                RejectionKind::Internal,
                "the thing failed while handling the request; it will be restarted from storage",
            )),
            Err(_) => Err(Rejection::new(
                RejectionKind::Timeout,
                format!(
                    "thing '{name}' did not answer within {} ms",
                    self.inner.config.request_timeout_ms
                ),
            )),
        }
    }

    /// Counters.
    pub fn stats(&self) -> RegistryStats {
        RegistryStats {
            active_things: self.inner.alive.load(Ordering::Relaxed),
            activations: self.inner.activations.load(Ordering::Relaxed),
            passivations: self.inner.passivations.load(Ordering::Relaxed),
            failures: self.inner.failures.load(Ordering::Relaxed),
        }
    }

    /// Takes one of the Thing's request places and delivers `message`, under one lock of its
    /// shard (a request on the hot path locks the shard here and once more to give the place
    /// back). Refused, the message is dropped undelivered.
    fn admit_and_route<'r>(
        &'r self,
        name: &'r str,
        message: ThingMsg,
    ) -> Result<InFlight<'r>, Rejection> {
        let shard = self.shard_of(name);
        let max = self.inner.config.requests_in_flight_max;
        let mut map = lock(&self.inner.shards[shard]);
        let count = match map.in_flight.get_mut(name) {
            Some(count) => count,
            None => map.in_flight.entry(name.to_owned()).or_insert(0),
        };
        if *count >= max {
            return Err(Rejection::new(
                RejectionKind::TooManyRequests,
                format!("Too many requests: thing '{name}' already has {max} requests in flight"),
            ));
        }
        *count += 1;
        let place = InFlight {
            registry: self,
            shard,
            name,
        };
        self.route_locked(shard, map, name, message);
        Ok(place)
    }

    fn shard_of(&self, name: &str) -> usize {
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        name.hash(&mut hasher);
        (hasher.finish() % self.inner.shards.len() as u64) as usize
    }

    /// Delivers a message to the Thing's current incarnation, or buffers it for the next one.
    pub fn route(&self, name: &str, message: ThingMsg) {
        let shard_index = self.shard_of(name);
        let map = lock(&self.inner.shards[shard_index]);
        self.route_locked(shard_index, map, name, message);
    }

    /// [`Registry::route`] with the Thing's shard already locked.
    fn route_locked(
        &self,
        shard_index: usize,
        mut map: MutexGuard<'_, ShardMap>,
        name: &str,
        message: ThingMsg,
    ) {
        match map.slots.get_mut(name) {
            Some(Slot::Active { actor, last_routed }) => {
                *last_routed = Instant::now();
                match actor.send_message(message) {
                    Ok(()) => {}
                    Err(ractor::MessagingErr::SendErr(message)) => {
                        // Dead or stopping: wait for its termination before the next incarnation.
                        let actor = actor.get_id();
                        map.slots.insert(
                            name.to_owned(),
                            Slot::Stopping {
                                actor,
                                buffered: vec![message],
                            },
                        );
                    }
                    Err(e) => tracing::error!(thing = name, error = %e, "cannot route to thing"),
                }
            }
            Some(Slot::Starting { buffered }) | Some(Slot::Stopping { buffered, .. }) => {
                buffered.push(message);
            }
            None => {
                map.slots.insert(
                    name.to_owned(),
                    Slot::Starting {
                        buffered: vec![message],
                    },
                );
                drop(map);
                self.spawn_activation(shard_index, name.to_owned());
            }
        }
    }

    fn spawn_activation(&self, shard_index: usize, name: String) {
        let registry = self.clone();
        tokio::spawn(async move {
            let supervisor = registry.inner.shards[shard_index].supervisor.clone();
            let args = ThingArgs {
                name: name.clone(),
                context: registry.inner.context.clone(),
            };
            let spawned = Actor::spawn_linked(None, ThingActor, args, supervisor).await;
            let shard = &registry.inner.shards[shard_index];
            let mut map = lock(shard);
            let buffered = match map.slots.remove(&name) {
                Some(Slot::Starting { buffered }) => buffered,
                other => {
                    // Only activation moves a slot out of Starting.
                    tracing::error!(thing = %name, "activation found its slot in an unexpected state");
                    if let Some(other) = other {
                        map.slots.insert(name.clone(), other);
                    }
                    return;
                }
            };
            match spawned {
                Ok((actor, _)) => {
                    registry.inner.activations.fetch_add(1, Ordering::Relaxed);
                    registry.inner.alive.fetch_add(1, Ordering::Relaxed);
                    map.names.insert(actor.get_id(), name.clone());
                    let mut undelivered = Vec::new();
                    for message in buffered {
                        if let Err(ractor::MessagingErr::SendErr(message)) =
                            actor.send_message(message)
                        {
                            undelivered.push(message);
                        }
                    }
                    let slot = if undelivered.is_empty() {
                        Slot::Active {
                            actor: actor.clone(),
                            last_routed: Instant::now(),
                        }
                    } else {
                        Slot::Stopping {
                            actor: actor.get_id(),
                            buffered: undelivered,
                        }
                    };
                    map.slots.insert(name, slot);
                }
                Err(e) => {
                    tracing::error!(thing = %name, error = %e, "thing actor failed to start");
                    drop(map);
                    for message in buffered {
                        if let ThingMsg::Request { reply, .. } = message {
                            let _ = reply.send(Err(Rejection::new(
                                RejectionKind::Unavailable,
                                "the thing could not be started",
                            )));
                        }
                    }
                }
            }
        });
    }

    /// Called by a shard supervisor when one of its Thing actors is gone.
    fn on_terminated(
        &self,
        shard_index: usize,
        id: ActorId,
        reason: Option<&str>,
        failure: Option<String>,
    ) {
        let shard = &self.inner.shards[shard_index];
        let mut map = lock(shard);
        let Some(name) = map.names.remove(&id) else {
            return;
        };
        self.inner.alive.fetch_sub(1, Ordering::Relaxed);
        if let Some(failure) = &failure {
            self.inner.failures.fetch_add(1, Ordering::Relaxed);
            tracing::error!(thing = %name, error = %failure, "thing actor died; it restarts from storage on its next request");
        } else if reason == Some("passivated") {
            self.inner.passivations.fetch_add(1, Ordering::Relaxed);
        }
        let buffered = match map.slots.remove(&name) {
            Some(Slot::Stopping { actor, buffered }) if actor == id => buffered,
            Some(Slot::Active { actor, .. }) if actor.get_id() == id => Vec::new(),
            Some(other) => {
                // A different incarnation owns the slot; leave it alone.
                map.slots.insert(name, other);
                return;
            }
            None => return,
        };
        if buffered.is_empty() {
            return;
        }
        map.slots.insert(name.clone(), Slot::Starting { buffered });
        drop(map);
        self.spawn_activation(shard_index, name);
    }

    /// Passivates idle Things until `stop` turns true (run by the node).
    pub async fn run_sweeper(self, mut stop: tokio::sync::watch::Receiver<bool>) {
        let idle = Duration::from_millis(self.inner.config.thing_idle_ms);
        let period = (idle / 4).clamp(Duration::from_millis(5), Duration::from_secs(1));
        let mut ticker = tokio::time::interval(period);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticker.tick() => self.passivate_idle(idle),
                _ = stop.wait_for(|stop| *stop) => return,
            }
        }
    }

    /// Passivates every Thing idle for at least `idle` (all of them with `Duration::ZERO`).
    pub fn passivate_idle(&self, idle: Duration) {
        let now = Instant::now();
        for shard in &self.inner.shards {
            let mut map = lock(shard);
            for slot in map.slots.values_mut() {
                let Slot::Active { actor, last_routed } = slot else {
                    continue;
                };
                if now.duration_since(*last_routed) < idle {
                    continue;
                }
                // Under the lock: Passivate is the last message this incarnation receives.
                let _ = actor.send_message(ThingMsg::Passivate);
                *slot = Slot::Stopping {
                    actor: actor.get_id(),
                    buffered: Vec::new(),
                };
            }
        }
    }

    /// Whether the Thing has a live (or starting) actor now.
    pub fn is_active(&self, name: &str) -> bool {
        let shard = &self.inner.shards[self.shard_of(name)];
        matches!(
            lock(shard).slots.get(name),
            Some(Slot::Active { .. } | Slot::Starting { .. })
        )
    }

    /// Passivates one Thing now if it has no request in flight (bulk work that touches each
    /// Thing once should not leave a million actors behind until they idle out).
    pub fn passivate_now(&self, name: &str) {
        let shard = &self.inner.shards[self.shard_of(name)];
        let mut map = lock(shard);
        if map.in_flight.contains_key(name) {
            return;
        }
        if let Some(slot) = map.slots.get_mut(name) {
            if let Slot::Active { actor, .. } = slot {
                // Under the lock: Passivate is the last message this incarnation receives.
                let _ = actor.send_message(ThingMsg::Passivate);
                *slot = Slot::Stopping {
                    actor: actor.get_id(),
                    buffered: Vec::new(),
                };
            }
        }
    }

    /// Passivates every Thing and waits (bounded) until all actors have stopped (their
    /// snapshots are durable with the next sync: [`crate::Node::shutdown`] makes it).
    pub async fn shutdown(&self, wait: Duration) {
        let deadline = Instant::now() + wait;
        loop {
            self.passivate_idle(Duration::ZERO);
            if self.inner.alive.load(Ordering::Relaxed) == 0 || Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let left = self.inner.alive.load(Ordering::Relaxed);
        if left > 0 {
            tracing::warn!(left, "shutdown: some things did not stop in time");
        }
        for shard in &self.inner.shards {
            shard.supervisor.stop(None);
        }
    }

    /// Sends a raw message to a Thing (fault-injection tests).
    #[cfg(feature = "test-util")]
    pub fn route_raw(&self, name: &str, message: ThingMsg) {
        self.route(name, message);
    }
}
