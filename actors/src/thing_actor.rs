//! The Thing actor: the persistence shell around the pure domain.
//!
//! One actor per active Thing owns its state. For each command: `decide` -> append the events
//! (returns when durable) -> `apply` -> maybe snapshot -> reply. Rejections are reply values;
//! the handler never returns `Err` (that would stop the actor).
//!
//! Recovery happens in `post_start` (snapshot + tail replay), so spawning never waits on disk.
//! A Thing whose log cannot be replayed stays up in a failed mode and answers every request with
//! 503 naming the bad record, so one corrupt Thing never affects the others.
//!
//! A panic inside the domain (decide/apply) is caught here: the request gets a 500, the state is
//! reloaded from storage (a restart from storage that keeps the mailbox), and queued requests go
//! on. Any other panic stops the actor; its shard supervisor (`crate::registry`) clears it and the
//! next request re-activates the Thing from storage.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use ractor::{Actor, ActorProcessingErr, ActorRef};
use thinghub_storage::{AppendBatch, IndexOp, Snapshot, StorageError, Store};
use tokio::sync::oneshot;

use crate::codec;
pub use crate::context::ThingContext;
use crate::thing::commands::{CommandPage, PageCursor};
use crate::thing::{
    self, CommandExecution, CommandOutcome, CommandStatus, Rejection, RejectionKind, Reply,
    ThingCommand, ThingDescription, ThingEvent, ThingState,
};

/// Most events read from storage per batch during replay.
const REPLAY_BATCH_EVENTS: usize = 1024;
/// A request to one Thing.
#[derive(Debug, Clone)]
pub enum Request {
    /// A command that may append events.
    Command(ThingCommand),
    /// The registry view (404 if unregistered).
    Describe,
    /// The shadow document (404 if the Thing or its shadow does not exist).
    GetShadow,
    /// The whole state (verification and tests).
    GetState,
    /// The deadline index entry `at_ms` of this Thing is due (sent by the deadline timer).
    FireDeadline {
        /// The entry that fired.
        at_ms: u64,
    },
    /// One command execution (404 if it is not in the state).
    GetCommand {
        /// Which one.
        execution_id: String,
    },
    /// Deliver again what the Thing owes for its events `first_seq..=last_seq` (sent by the
    /// outbox keeper for change-feed positions whose effects may not have been delivered).
    Redeliver {
        /// First event of the range.
        first_seq: u64,
        /// Last event of the range (events beyond the log's end are ignored).
        last_seq: u64,
    },
    /// The Thing's job executions (404 if it is not registered).
    GetJobs,
    /// A page of command executions, newest first.
    ListCommands {
        /// Only this status.
        status: Option<CommandStatus>,
        /// Continue after this position.
        cursor: Option<PageCursor>,
        /// Page size.
        limit: usize,
    },
}

/// A successful answer.
#[derive(Debug, Clone, PartialEq)]
pub enum Response {
    /// A command's reply, sent after its events are durable.
    Decided(Reply),
    /// The registry view.
    Description(ThingDescription),
    /// The shadow document.
    Shadow(thing::shadow::ShadowDocument),
    /// The whole state.
    State(Box<ThingState>),
    /// Deadlines fired: how many executions timed out.
    Fired {
        /// Executions moved to TIMED_OUT.
        timed_out: usize,
    },
    /// One command execution.
    Execution(Box<CommandExecution>),
    /// A page of command executions.
    Executions(CommandPage),
    /// Effects delivered again: how many.
    Redelivered(usize),
    /// The Thing's job executions.
    Jobs(Box<thing::jobs::JobExecutions>),
}

/// The reply channel of a request.
pub type ReplyTo = oneshot::Sender<Result<Response, Rejection>>;

/// Messages a Thing actor handles.
pub enum ThingMsg {
    /// A request with its reply channel.
    Request {
        /// What is asked.
        request: Request,
        /// Where the answer goes.
        reply: ReplyTo,
    },
    /// Sent by the registry when the Thing has been idle: snapshot if needed, then stop.
    /// The registry routes nothing to this incarnation after it.
    Passivate,
    /// Fault injection: panic inside (`guarded`) or outside the domain guard.
    #[cfg(feature = "test-util")]
    InjectPanic {
        /// Whether the panic happens inside the guard (caught by the actor) or not.
        guarded: bool,
        /// Receives an internal error when guarded.
        reply: ReplyTo,
    },
}

/// The actor (a unit struct; everything lives in its state).
pub struct ThingActor;

/// Arguments of a Thing actor.
pub struct ThingArgs {
    /// The Thing's name.
    pub name: String,
    /// Shared context.
    pub context: Arc<ThingContext>,
}

enum Health {
    Ready,
    /// Replay failed; every request is answered with this reason.
    Failed(String),
}

/// The actor's state.
pub struct ThingActorState {
    thing: ThingState,
    context: Arc<ThingContext>,
    health: Health,
    events_since_snapshot: u64,
}

impl Actor for ThingActor {
    type Msg = ThingMsg;
    type State = ThingActorState;
    type Arguments = ThingArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<ThingMsg>,
        args: ThingArgs,
    ) -> Result<ThingActorState, ActorProcessingErr> {
        Ok(ThingActorState {
            thing: ThingState::new(args.name),
            context: args.context,
            health: Health::Ready,
            events_since_snapshot: 0,
        })
    }

    async fn post_start(
        &self,
        _myself: ActorRef<ThingMsg>,
        state: &mut ThingActorState,
    ) -> Result<(), ActorProcessingErr> {
        state.reload();
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<ThingMsg>,
        message: ThingMsg,
        state: &mut ThingActorState,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            ThingMsg::Request { request, reply } => {
                #[cfg(feature = "test-util")]
                let hold = crate::fault::reply_hold(&request);
                // Boxed: ractor keeps the message loop's future (and so this one) for the actor's whole
                // life; inline, this ~1.5 KB future cost every active Thing 2.7 KB of RAM.
                let answer = Box::pin(state.handle_request(request)).await;
                #[cfg(feature = "test-util")]
                if let Some(hold) = hold {
                    tokio::time::sleep(hold).await;
                }
                // The caller may have gone away (timeout, disconnect): nothing to do then.
                let _ = reply.send(answer);
            }
            ThingMsg::Passivate => {
                if state.events_since_snapshot > 0 {
                    state.write_snapshot();
                }
                myself.stop(Some("passivated".into()));
            }
            #[cfg(feature = "test-util")]
            ThingMsg::InjectPanic { guarded, reply } => {
                if guarded {
                    let answer = state.guarded(|_| -> Result<Response, Rejection> {
                        panic!("injected panic (guarded)")
                    });
                    let _ = reply.send(answer);
                } else {
                    drop(reply);
                    panic!("injected panic (unguarded)");
                }
            }
        }
        Ok(())
    }
}

/// Rebuilds a Thing's state from storage: snapshot (if usable) + every later event.
pub fn load_state(store: &Store, name: &str) -> Result<ThingState, StorageError> {
    let mut state = match store.get_snapshot(name) {
        Ok(Some(Snapshot {
            seq,
            state: envelope,
        })) => match codec::decode_state(name, &envelope) {
            Ok(mut state) => {
                state.last_seq = seq;
                state
            }
            Err(e) => {
                tracing::warn!(thing = name, error = %e, "ignoring unusable snapshot; replaying the whole log");
                ThingState::new(name)
            }
        },
        Ok(None) => ThingState::new(name),
        Err(e) => {
            tracing::warn!(thing = name, error = %e, "ignoring unreadable snapshot; replaying the whole log");
            ThingState::new(name)
        }
    };
    loop {
        let batch = store.read_events(name, state.last_seq + 1, REPLAY_BATCH_EVENTS)?;
        let Some(last) = batch.last() else {
            return Ok(state);
        };
        let last_seq = last.seq;
        for recorded in &batch {
            if recorded.seq != state.last_seq + 1 {
                return Err(StorageError::Corrupt {
                    thing: name.to_owned(),
                    seq: recorded.seq,
                    reason: format!("gap in the log after seq {}", state.last_seq),
                });
            }
            let event = codec::decode_event(name, recorded)?;
            thing::apply(&mut state, &event);
            state.last_seq = recorded.seq;
        }
        debug_assert_eq!(state.last_seq, last_seq);
    }
}

impl ThingActorState {
    /// (Re)loads the state from storage; on failure the Thing serves 503s.
    fn reload(&mut self) {
        let name = self.thing.name.clone();
        let loaded =
            std::panic::catch_unwind(AssertUnwindSafe(|| load_state(&self.context.store, &name)));
        match loaded {
            Ok(Ok(thing)) => {
                self.thing = thing;
                self.health = Health::Ready;
                self.repair_index();
                self.repair_client_id();
                self.repair_deadline();
                self.repair_alarms();
                self.repair_online();
            }
            Ok(Err(e)) => {
                tracing::error!(thing = %name, error = %e, "thing cannot be loaded; serving 503 for it");
                self.health = Health::Failed(e.to_string());
            }
            Err(_) => {
                tracing::error!(thing = %name, "replay panicked; serving 503 for it");
                self.health = Health::Failed("replay panicked".into());
            }
        }
        self.events_since_snapshot = 0;
    }

    /// Makes the registry index agree with the log (a crash can fall between the two writes).
    fn repair_index(&self) {
        let name = &self.thing.name;
        let store = &self.context.store;
        let wanted = self
            .thing
            .registration
            .as_ref()
            .map(|r| codec::ThingIndexRecord {
                mqtt_client_id: r.mqtt_client_id.clone(),
                thing_type: r.thing_type.clone(),
                created_at_ms: r.created_at_ms,
            });
        let present = match store.get_thing(name) {
            Ok(bytes) => bytes.map(|b| codec::decode_index_record(name, &b)),
            Err(e) => {
                tracing::warn!(thing = %name, error = %e, "cannot read the registry index");
                return;
            }
        };
        let op = match (wanted, present) {
            (Some(wanted), Some(Ok(present))) if wanted == present => return,
            (None, None) => return,
            (Some(wanted), _) => match codec::encode_index_record(&wanted) {
                Ok(bytes) => IndexOp::PutThing(bytes),
                Err(_) => return,
            },
            (None, Some(_)) => IndexOp::RemoveThing,
        };
        tracing::warn!(thing = %name, ?op, "registry index disagreed with the log; repaired");
        if let Err(e) = store.repair_index(name, &[op]) {
            tracing::warn!(thing = %name, error = %e, "cannot repair the registry index");
        }
    }

    /// Makes the `client_ids` index name this Thing for its MQTT client id.
    fn repair_client_id(&self) {
        let Some(registration) = &self.thing.registration else {
            return;
        };
        let name = &self.thing.name;
        let client_id = &registration.mqtt_client_id;
        let store = &self.context.store;
        match store.client_id_owner(client_id) {
            Ok(Some(owner)) if owner == *name => {}
            Ok(_) => {
                tracing::warn!(thing = %name, %client_id, "client id index disagreed with the log; repaired");
                if let Err(e) = store.repair_index(name, &[IndexOp::PutClientId(client_id.clone())])
                {
                    tracing::warn!(thing = %name, error = %e, "cannot repair the client id index");
                }
            }
            Err(e) => tracing::warn!(thing = %name, error = %e, "cannot read the client id index"),
        }
    }

    /// The `online` index holds the Thing exactly when its state says it is connected.
    fn repair_online(&self) {
        let name = &self.thing.name;
        let store = &self.context.store;
        let connection = &self.thing.connection;
        let wanted = (self.thing.registration.is_some() && connection.online).then(|| {
            (
                connection.client_id.clone().unwrap_or_default(),
                connection.connection_id,
            )
        });
        let present = match store.online_entry(name) {
            Ok(present) => present,
            Err(e) => {
                tracing::warn!(thing = %name, error = %e, "cannot read the online index");
                return;
            }
        };
        if wanted == present {
            return;
        }
        let op = match wanted {
            Some((client_id, connection_id)) => IndexOp::PutOnline {
                client_id,
                connection_id,
            },
            None => IndexOp::RemoveOnline,
        };
        tracing::warn!(thing = %name, ?op, "online index disagreed with the log; repaired");
        if let Err(e) = store.repair_index(name, &[op]) {
            tracing::warn!(thing = %name, error = %e, "cannot repair the online index");
        }
    }

    /// The fleet-wide alarm listing holds exactly this Thing's alarms as its state has them.
    fn repair_alarms(&self) {
        let name = &self.thing.name;
        let store = &self.context.store;
        let listed = match store.scan_alarms(
            Some(&format!("{name}/")),
            None,
            usize::MAX,
            usize::MAX,
            |_| true,
        ) {
            Ok((listed, _)) => listed,
            Err(e) => {
                tracing::warn!(thing = %name, error = %e, "cannot read the alarm index");
                return;
            }
        };
        let mut ops = Vec::new();
        for (key, bytes) in &listed {
            let alarm_type = &key[name.len() + 1..];
            let wanted = self.thing.alarms.alarms.get(alarm_type);
            let present = crate::alarms::decode_alarm_record(bytes).ok();
            if wanted.is_none() || self.thing.registration.is_none() {
                ops.push(IndexOp::RemoveAlarm {
                    alarm_type: alarm_type.to_owned(),
                });
            } else if wanted != present.as_ref() {
                ops.extend(wanted.and_then(|alarm| {
                    let record = crate::alarms::encode_alarm_record(alarm, 0).ok()?;
                    Some(IndexOp::PutAlarm {
                        alarm_type: alarm_type.to_owned(),
                        record,
                    })
                }));
            }
        }
        if self.thing.registration.is_some() {
            for (alarm_type, alarm) in &self.thing.alarms.alarms {
                let is_listed = listed
                    .iter()
                    .any(|(key, _)| &key[name.len() + 1..] == alarm_type.as_str());
                if !is_listed {
                    if let Ok(record) = crate::alarms::encode_alarm_record(alarm, 0) {
                        ops.push(IndexOp::PutAlarm {
                            alarm_type: alarm_type.clone(),
                            record,
                        });
                    }
                }
            }
        }
        if ops.is_empty() {
            return;
        }
        tracing::warn!(thing = %name, changes = ops.len(), "alarm index disagreed with the log; repaired");
        if let Err(e) = store.repair_index(name, &ops) {
            tracing::warn!(thing = %name, error = %e, "cannot repair the alarm index");
        }
    }

    /// Makes sure the Thing's earliest pending deadline is in the deadline index (the index
    /// entry is written before the events that need it, so this only matters after a repair
    /// or a lost index write).
    fn repair_deadline(&self) {
        let Some(at_ms) = self.thing.next_deadline_ms() else {
            return;
        };
        let name = &self.thing.name;
        let store = &self.context.store;
        match store.has_deadline(name, at_ms) {
            Ok(true) => {}
            Ok(false) => {
                tracing::warn!(thing = %name, at_ms, "pending deadline missing from the index; repaired");
                match store.repair_index(name, &[IndexOp::PutDeadline { at_ms }]) {
                    Ok(()) => self.context.deadlines.scheduled(at_ms),
                    Err(e) => {
                        tracing::warn!(thing = %name, error = %e, "cannot repair the deadline index")
                    }
                }
            }
            Err(e) => tracing::warn!(thing = %name, error = %e, "cannot read the deadline index"),
        }
    }

    /// Runs domain code; a panic becomes a 500 for this request and a reload from storage.
    fn guarded<T>(
        &mut self,
        work: impl FnOnce(&mut Self) -> Result<T, Rejection>,
    ) -> Result<T, Rejection> {
        match std::panic::catch_unwind(AssertUnwindSafe(|| work(self))) {
            Ok(result) => result,
            Err(panic) => {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "non-string panic".into());
                tracing::error!(thing = %self.thing.name, panic = %what, "thing panicked; restarting it from storage");
                self.reload();
                Err(internal(
                    "the request failed inside the server; the thing was restarted",
                ))
            }
        }
    }

    async fn handle_request(&mut self, request: Request) -> Result<Response, Rejection> {
        if let Health::Failed(reason) = &self.health {
            return Err(Rejection::new(
                RejectionKind::Unavailable,
                format!("thing '{}' is unavailable: {reason}", self.thing.name),
            ));
        }
        match request {
            Request::Describe => self
                .thing
                .describe()
                .map(Response::Description)
                .ok_or_else(|| self.thing.not_found()),
            Request::GetShadow => {
                if self.thing.registration.is_none() {
                    return Err(self.thing.not_found());
                }
                self.thing
                    .shadow
                    .document()
                    .map(Response::Shadow)
                    .ok_or_else(|| thing::shadow::no_shadow(&self.thing.name))
            }
            Request::GetState => Ok(Response::State(Box::new(self.thing.clone()))),
            Request::Command(command) => self.handle_command(command, None).await,
            Request::FireDeadline { at_ms } => {
                match self
                    .handle_command(
                        ThingCommand::FireDeadlines {
                            offline_rules: Vec::new(),
                            serving_since_ms: 0,
                        },
                        Some(at_ms),
                    )
                    .await?
                {
                    Response::Decided(Reply::Command(CommandOutcome::TimedOut(timed_out))) => {
                        Ok(Response::Fired { timed_out })
                    }
                    other => Ok(other),
                }
            }
            Request::Redeliver {
                first_seq,
                last_seq,
            } => self.redeliver(first_seq, last_seq),
            Request::GetCommand { execution_id } => {
                if self.thing.registration.is_none() {
                    return Err(self.thing.not_found());
                }
                self.thing
                    .commands
                    .get(&execution_id)
                    .map(|e| Response::Execution(Box::new(e.clone())))
                    .ok_or_else(|| {
                        Rejection::new(
                            RejectionKind::ExecutionNotFound,
                            format!(
                                "execution '{execution_id}' not found (finished executions beyond the kept history are only in the Thing's history)"
                            ),
                        )
                    })
            }
            Request::GetJobs => {
                if self.thing.registration.is_none() {
                    return Err(self.thing.not_found());
                }
                Ok(Response::Jobs(Box::new(self.thing.jobs.clone())))
            }
            Request::ListCommands {
                status,
                cursor,
                limit,
            } => {
                if self.thing.registration.is_none() {
                    return Err(self.thing.not_found());
                }
                Ok(Response::Executions(self.thing.commands.page(
                    status,
                    cursor.as_ref(),
                    limit,
                )))
            }
        }
    }

    /// Decides, appends durably, applies, replies. `fired` is the deadline index entry that
    /// triggered a `FireDeadlines` (removed if it is no longer the Thing's next deadline).
    async fn handle_command(
        &mut self,
        mut command: ThingCommand,
        fired: Option<u64>,
    ) -> Result<Response, Rejection> {
        match &mut command {
            ThingCommand::UpdateShadow { want_documents, .. } => {
                // Rendered for the sink only, and only when someone listens.
                *want_documents = self.context.outbox.sink().wants_documents(&self.thing.name);
            }
            // The rules that apply to this Thing now (rules are fleet configuration).
            ThingCommand::RecordDisconnected { offline_rules, .. } => {
                let (store, name) = (&self.context.store, &self.thing.name);
                *offline_rules =
                    self.context
                        .alarm_rules
                        .applicable_or_more(store, name, self.thing_type());
            }
            ThingCommand::FireDeadlines {
                offline_rules,
                serving_since_ms,
            } => {
                let (store, name) = (&self.context.store, &self.thing.name);
                *serving_since_ms = self.context.alarm_rules.serving_since_ms();
                // Unknown membership: the timer tries again (a watch must not be dropped for
                // a read that failed).
                *offline_rules = self
                    .context
                    .alarm_rules
                    .applicable(store, name, self.thing_type())
                    .map_err(|e| {
                        tracing::warn!(thing = %name, error = %e, "cannot read the alarm rules' group membership; the deadline fires again later");
                        Rejection::new(
                            RejectionKind::Unavailable,
                            format!("cannot read group membership: {e}"),
                        )
                    })?;
            }
            _ => {}
        }
        let now_ms = self.context.clock.now_ms();
        let limits = self.context.limits;
        let mut decision =
            match self.guarded(|me| thing::decide(&me.thing, &command, now_ms, &limits)) {
                Ok(decision) => decision,
                Err(rejection) => {
                    self.context.counters.refused(&command);
                    return Err(rejection);
                }
            };
        // Only command, job and alarm events move deadlines: other requests (the shadow hot
        // path) skip this.
        let has_job_events = decision.job_events().next().is_some();
        let has_alarm_events = decision.alarm_events().next().is_some();
        let (deadline_before, deadline_after) = if fired.is_none()
            && decision.command_events().next().is_none()
            && !has_job_events
            && !has_alarm_events
        {
            (None, None)
        } else {
            (
                self.thing.next_deadline_ms(),
                self.thing.next_deadline_after(&decision),
            )
        };
        let mut deadline_ops = Vec::new();
        if deadline_after != deadline_before {
            deadline_ops.extend(deadline_after.map(|at_ms| IndexOp::PutDeadline { at_ms }));
            deadline_ops.extend(deadline_before.map(|at_ms| IndexOp::RemoveDeadline { at_ms }));
        }
        if let Some(fired) = fired {
            if Some(fired) != deadline_after && Some(fired) != deadline_before {
                // A stale entry (e.g. left by a crash): nothing of this Thing is due at it.
                deadline_ops.push(IndexOp::RemoveDeadline { at_ms: fired });
            }
        }
        if decision.events.is_empty() {
            if !deadline_ops.is_empty() {
                if let Err(e) = self
                    .context
                    .store
                    .repair_index(&self.thing.name, &deadline_ops)
                {
                    tracing::warn!(thing = %self.thing.name, error = %e, "cannot clean the deadline index");
                }
            }
            return Ok(Response::Decided(decision.reply));
        }
        let mut batch = self.batch_for(&decision.events, now_ms)?;
        batch.index.extend(deadline_ops);
        let count = decision.events.len() as u64;
        let position = match self.context.store.append(batch).await {
            Ok(position) => position,
            // Refused before anything was written: the state stands, the client may retry.
            Err(e @ StorageError::Busy(_)) => {
                self.context.counters.refused(&command);
                return Err(Rejection::new(RejectionKind::Unavailable, e.to_string()));
            }
            Err(e) => {
                tracing::error!(thing = %self.thing.name, error = %e, "append failed; reloading from storage");
                // The write may or may not have reached the log: take storage as the truth (the
                // outbox recovers the effects of whatever did land).
                self.reload();
                return Err(internal(
                    "the change could not be made durable; its outcome is unknown",
                ));
            }
        };
        let effects = self.guarded(|me| {
            let jobs_before = has_job_events.then(|| me.thing.jobs.pending_view());
            thing::apply_decision(&mut me.thing, &mut decision);
            for event in &decision.events {
                me.context.counters.durable(event);
            }
            me.thing.last_seq += count;
            Ok(thing::effects::of_decision(
                &decision,
                jobs_before.as_ref(),
                &me.thing,
            ))
        })?;
        // Before the reply: whoever waits on it (a device's PUBACK, an HTTP 200) can rely on
        // the effects being on their way.
        self.context
            .outbox
            .deliver(&self.thing.name, position, &effects);
        self.events_since_snapshot += count;
        if self.events_since_snapshot >= self.context.snapshot_every_events {
            self.write_snapshot();
        }
        if deadline_after != deadline_before {
            if let Some(at_ms) = deadline_after {
                self.context.deadlines.scheduled(at_ms);
            }
        }
        Ok(Response::Decided(decision.reply))
    }

    fn thing_type(&self) -> Option<&str> {
        self.thing
            .registration
            .as_ref()
            .and_then(|r| r.thing_type.as_deref())
    }

    /// Delivers again what the Thing owes for its events `first_seq..=last_seq`.
    fn redeliver(&mut self, first_seq: u64, last_seq: u64) -> Result<Response, Rejection> {
        let name = self.thing.name.clone();
        let first_seq = first_seq.max(1);
        let last_seq = last_seq.min(self.thing.last_seq);
        let mut events = Vec::new();
        self.read_log(first_seq, last_seq, |event| events.push(event))?;
        let client_id_before = if thing::effects::needs_client_id_before(&events) {
            let mut held = None;
            self.read_log(1, first_seq.saturating_sub(1), |event| match event {
                ThingEvent::Registered(registered) => held = Some(registered.mqtt_client_id),
                ThingEvent::Deleted(_) => held = None,
                _ => {}
            })?;
            held
        } else {
            None
        };
        let now_s = self.context.clock.now_ms() / 1000;
        let effects = self.guarded(|me| {
            Ok(thing::effects::for_recovery(
                &events,
                &me.thing,
                client_id_before.as_deref(),
                now_s,
            ))
        })?;
        if !effects.is_empty() {
            tracing::info!(thing = %name, first_seq, last_seq, effects = effects.len(), "effects delivered again");
            self.context.outbox.sink().deliver(&name, &effects);
        }
        Ok(Response::Redelivered(effects.len()))
    }

    /// Feeds the decoded events `first_seq..=last_seq` of the log to `each` in order.
    fn read_log(
        &self,
        first_seq: u64,
        last_seq: u64,
        mut each: impl FnMut(ThingEvent),
    ) -> Result<(), Rejection> {
        let name = &self.thing.name;
        let mut next = first_seq;
        while next <= last_seq {
            let wanted = usize::try_from(last_seq - next + 1)
                .unwrap_or(usize::MAX)
                .min(REPLAY_BATCH_EVENTS);
            let batch = self
                .context
                .store
                .read_events(name, next, wanted)
                .map_err(|e| {
                    tracing::error!(thing = %name, error = %e, "cannot read events to redeliver their effects");
                    Rejection::new(RejectionKind::Unavailable, format!("cannot read the log: {e}"))
                })?;
            let Some(last) = batch.last() else { break };
            next = last.seq.saturating_add(1);
            for recorded in batch.iter().filter(|r| r.seq <= last_seq) {
                let event = codec::decode_event(name, recorded).map_err(|e| {
                    Rejection::new(
                        RejectionKind::Unavailable,
                        format!("cannot decode the log: {e}"),
                    )
                })?;
                each(event);
            }
        }
        Ok(())
    }

    fn batch_for(&self, events: &[ThingEvent], now_ms: u64) -> Result<AppendBatch, Rejection> {
        let mut envelopes = Vec::with_capacity(events.len());
        let mut index = Vec::new();
        let mut alarms = None;
        for event in events {
            envelopes.push(codec::encode_event(event, now_ms).map_err(|e| {
                tracing::error!(thing = %self.thing.name, error = %e, "cannot encode event");
                internal("the change could not be encoded")
            })?);
            match event {
                ThingEvent::Registered(registered) => {
                    let record = codec::ThingIndexRecord {
                        mqtt_client_id: registered.mqtt_client_id.clone(),
                        thing_type: registered.thing_type.clone(),
                        created_at_ms: registered.created_at_ms,
                    };
                    let bytes = codec::encode_index_record(&record)
                        .map_err(|_| internal("the registry record could not be encoded"))?;
                    index.push(IndexOp::PutThing(bytes));
                    index.push(IndexOp::PutClientId(registered.mqtt_client_id.clone()));
                }
                ThingEvent::Deleted(_) => {
                    index.push(IndexOp::RemoveThing);
                    if let Some(registration) = &self.thing.registration {
                        index.push(IndexOp::RemoveClientId(registration.mqtt_client_id.clone()));
                    }
                    index.push(IndexOp::RemoveOnline);
                    // Its alarms leave the fleet-wide listing (they stay in its history).
                    index.extend(self.thing.alarms.alarms.keys().map(|alarm_type| {
                        IndexOp::RemoveAlarm {
                            alarm_type: alarm_type.clone(),
                        }
                    }));
                }
                ThingEvent::Alarm(event) => {
                    // The listing holds each type's alarm as it is after this event.
                    let alarms = alarms.get_or_insert_with(|| self.thing.alarms.clone());
                    alarms.apply(event);
                    if let Some(alarm) = alarms.alarms.get(event.alarm_type()) {
                        if !matches!(
                            event,
                            thing::AlarmEvent::Armed(_) | thing::AlarmEvent::Disarmed(_)
                        ) {
                            let record = crate::alarms::encode_alarm_record(alarm, now_ms)
                                .map_err(|_| internal("the alarm record could not be encoded"))?;
                            index.push(IndexOp::PutAlarm {
                                alarm_type: alarm.alarm_type.clone(),
                                record,
                            });
                        }
                    }
                }
                ThingEvent::Connected(connected) => index.push(IndexOp::PutOnline {
                    client_id: connected.client_id.clone(),
                    connection_id: connected.connection_id,
                }),
                ThingEvent::Disconnected(disconnected) => {
                    let current = &self.thing.connection;
                    if current.online && current.connection_id == disconnected.connection_id {
                        index.push(IndexOp::RemoveOnline);
                    }
                }
                ThingEvent::ShadowUpdated(_)
                | ThingEvent::ShadowDeleted(_)
                | ThingEvent::EventIngested(_)
                | ThingEvent::MeasurementsRecorded(_)
                | ThingEvent::Command(_)
                | ThingEvent::Job(_) => {}
            }
        }
        Ok(AppendBatch {
            thing: self.thing.name.clone(),
            first_seq: self.thing.last_seq + 1,
            events: envelopes,
            index,
        })
    }

    /// Writes a snapshot of the applied state (durable with the next group commit).
    fn write_snapshot(&mut self) {
        let snapshot =
            codec::encode_state(&self.thing, self.context.clock.now_ms()).map(|state| Snapshot {
                seq: self.thing.last_seq,
                state,
            });
        match snapshot.and_then(|s| self.context.store.put_snapshot(&self.thing.name, &s)) {
            Ok(()) => self.events_since_snapshot = 0,
            Err(e) => {
                tracing::warn!(thing = %self.thing.name, error = %e, "snapshot failed (the log is still complete)")
            }
        }
    }
}

fn internal(message: &str) -> Rejection {
    Rejection::new(RejectionKind::Internal, message)
}
