//! What a committed change causes for anyone but the requester waiting on its reply: the one
//! place that decides it, as pure functions of the events and the Thing's state.
//!
//! - [`of_decision`]: the effects of a change just made durable (the live path; the decision's
//!   reply already holds what was rendered while deciding: the accepted document, the delta).
//! - [`for_recovery`]: the effects owed again for events whose delivery may have been cut short
//!   (after a crash, or a straggler in the change feed), re-derived from each event, minus what a
//!   newer state supersedes. Duplicates are fine: every effect carries its version or execution
//!   id, so a device can drop a repeat.
//!
//! Effects name no topic: the sink (the MQTT frontend) renders them.

use std::sync::Arc;

use serde_json::Value;

use super::commands::{CommandEvent, CommandStatus};
use super::jobs::{JobEvent, PendingView};
use super::shadow;
use super::{CommandExecution, Decision, EventIngested, Reply, ThingEvent, ThingState};

/// One thing a committed change causes.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// The Thing was registered: its MQTT client id is reserved for it from now on.
    ThingRegistered {
        /// The reserved client id.
        mqtt_client_id: String,
    },
    /// The Thing was deleted: whatever acts as it loses its session.
    ThingDeleted {
        /// The client id it held.
        mqtt_client_id: String,
    },
    /// A shadow update was accepted: its document (AWS `update/accepted`) as JSON text, for
    /// every listener.
    ShadowAccepted(Arc<str>),
    /// An operator changed desired: `{state:{desired}, version, timestamp}` for the device.
    DesiredPushed(Arc<Value>),
    /// Desired differs from reported after the change: `{version, timestamp, state, metadata}`.
    Delta(Arc<Value>),
    /// `{previous, current, timestamp, clientToken}` (rendered only when the sink wants them).
    Documents(Arc<Value>),
    /// The shadow document was deleted: `{version, timestamp, clientToken}`.
    ShadowDeleted(Value),
    /// A command execution to request from the device.
    CommandRequested(Box<CommandExecution>),
    /// The device's answer to an execution was accepted.
    CommandAnswered {
        /// Which execution.
        execution_id: String,
        /// Its status after the answer.
        status: CommandStatus,
        /// Unix ms of the answer.
        at_ms: u64,
    },
    /// An execution ended without an answer: timed out (the deadline timer) or canceled by an
    /// operator. Nothing in the device contracts announces it; consumers such as webhooks do.
    CommandEnded {
        /// Which execution.
        execution_id: String,
        /// `TIMED_OUT` or `CANCELED`.
        status: CommandStatus,
        /// Unix ms.
        at_ms: u64,
    },
    /// A device event was stored.
    EventAccepted(EventIngested),
    /// The Thing's pending job list changed: `{timestamp, jobs: {IN_PROGRESS, QUEUED}}` (AWS
    /// `jobs/notify`).
    JobsNotify(Value),
    /// The job `start-next` would take changed: `{timestamp, execution?}` (AWS
    /// `jobs/notify-next`; no `execution` when none is pending).
    JobsNotifyNext(Value),
}

impl Effect {
    /// A short name (logs, metrics, fault injection).
    pub fn name(&self) -> &'static str {
        match self {
            Effect::ThingRegistered { .. } => "thing-registered",
            Effect::ThingDeleted { .. } => "thing-deleted",
            Effect::ShadowAccepted(_) => "shadow-accepted",
            Effect::DesiredPushed(_) => "desired-pushed",
            Effect::Delta(_) => "delta",
            Effect::Documents(_) => "documents",
            Effect::ShadowDeleted(_) => "shadow-deleted",
            Effect::CommandRequested(_) => "command-requested",
            Effect::CommandAnswered { .. } => "command-answered",
            Effect::CommandEnded { .. } => "command-ended",
            Effect::EventAccepted(_) => "event-accepted",
            Effect::JobsNotify(_) => "jobs-notify",
            Effect::JobsNotifyNext(_) => "jobs-notify-next",
        }
    }
}

/// The effects of `decision`, whose events are durable and applied (`after` is the state then;
/// `jobs_before` is the pending job view before them, given when the decision has job events).
pub fn of_decision(
    decision: &Decision,
    jobs_before: Option<&PendingView>,
    after: &ThingState,
) -> Vec<Effect> {
    let mut effects = Vec::new();
    match &decision.reply {
        Reply::ShadowUpdated(result) => {
            effects.push(Effect::ShadowAccepted(result.accepted.clone()));
            if let Some(desired) = &result.desired_published {
                effects.push(Effect::DesiredPushed(desired.clone()));
            }
            if let Some(delta) = &result.delta {
                effects.push(Effect::Delta(delta.clone()));
            }
            if let Some(documents) = &result.documents {
                effects.push(Effect::Documents(documents.clone()));
            }
        }
        Reply::ShadowDeleted(reply) => effects.push(Effect::ShadowDeleted(reply.clone())),
        Reply::EventStored(event) => effects.push(Effect::EventAccepted(event.clone())),
        Reply::Registered(description) => effects.push(Effect::ThingRegistered {
            mqtt_client_id: description.mqtt_client_id.clone(),
        }),
        Reply::Deleted { mqtt_client_id } => effects.push(Effect::ThingDeleted {
            mqtt_client_id: mqtt_client_id.clone(),
        }),
        // Command and job effects come from the events below (a time-out can ride along any
        // decision); connection and alarm records reach others through the change feed only.
        Reply::Command(_) | Reply::Job(_) | Reply::Recorded | Reply::Alarm(_) => {}
    }
    for event in decision.command_events() {
        effects.extend(of_command_event(event, after));
    }
    if let (Some(before), Some(at_ms)) = (
        jobs_before,
        decision.job_events().map(JobEvent::at_ms).max(),
    ) {
        let now = after.jobs.pending_view();
        if now != *before {
            effects.push(jobs_notify(after, at_ms / 1000));
        }
        if now.head() != before.head() {
            effects.push(jobs_notify_next(after, at_ms / 1000));
        }
    }
    effects
}

/// What a command event causes; `now` is a state at or after it (a request is owed only while
/// its execution is still pending there).
fn of_command_event(event: &CommandEvent, now: &ThingState) -> Option<Effect> {
    match event {
        CommandEvent::Sent(sent) => now
            .commands
            .get(&sent.execution_id)
            .filter(|execution| !execution.status.is_terminal())
            .map(|execution| Effect::CommandRequested(Box::new(execution.clone()))),
        CommandEvent::Responded(answer) => Some(Effect::CommandAnswered {
            execution_id: answer.execution_id.clone(),
            status: answer.status,
            at_ms: answer.at_ms,
        }),
        CommandEvent::TimedOut(finished) => Some(Effect::CommandEnded {
            execution_id: finished.execution_id.clone(),
            status: CommandStatus::TimedOut,
            at_ms: finished.at_ms,
        }),
        CommandEvent::Canceled(finished) => Some(Effect::CommandEnded {
            execution_id: finished.execution_id.clone(),
            status: CommandStatus::Canceled,
            at_ms: finished.at_ms,
        }),
        // A refused answer is the answering device's own reply, rendered by its frontend.
        CommandEvent::ResponseRefused(_) => None,
    }
}

/// The effects owed again for `events` (consecutive, in log order), whose delivery may have been
/// cut short (a crash between the commit and the sink, or a straggler in the change feed); `now`
/// is the Thing's state after them and possibly after later events. Each event gives what it gave
/// when it was made, with these differences, all of them because a newer state supersedes:
/// - a command request only while its execution is still pending;
/// - a registration only while the Thing still holds that client id, a deletion only while the
///   Thing is still deleted (`client_id_before` is the client id it held when `events` begin,
///   for a deletion whose registration lies before them);
/// - no `update/documents` (the previous document is not kept) and no per-update delta: one delta
///   of the current shadow instead, when any of `events` changed it and desired differs.
///
/// `now_s` stamps that delta.
pub fn for_recovery(
    events: &[ThingEvent],
    now: &ThingState,
    client_id_before: Option<&str>,
    now_s: u64,
) -> Vec<Effect> {
    let mut effects = Vec::new();
    let mut shadow_changed = false;
    let mut jobs_changed = false;
    let mut client_id = client_id_before.map(str::to_owned);
    let held_now = now.registration.as_ref().map(|r| r.mqtt_client_id.as_str());
    for event in events {
        match event {
            ThingEvent::Registered(registered) => {
                client_id = Some(registered.mqtt_client_id.clone());
                if held_now == Some(registered.mqtt_client_id.as_str()) {
                    effects.push(Effect::ThingRegistered {
                        mqtt_client_id: registered.mqtt_client_id.clone(),
                    });
                }
            }
            ThingEvent::Deleted(_) => {
                if let (None, Some(held)) = (held_now, &client_id) {
                    effects.push(Effect::ThingDeleted {
                        mqtt_client_id: held.clone(),
                    });
                }
            }
            ThingEvent::ShadowUpdated(update) => {
                shadow_changed = true;
                effects.push(Effect::ShadowAccepted(shadow::accepted_of(update)));
                effects.extend(
                    shadow::desired_pushed_of(update)
                        .map(|desired| Effect::DesiredPushed(Arc::new(desired))),
                );
            }
            ThingEvent::ShadowDeleted(deleted) => {
                shadow_changed = true;
                effects.push(Effect::ShadowDeleted(shadow::deleted_of(deleted)));
            }
            ThingEvent::EventIngested(ingested) => {
                effects.push(Effect::EventAccepted(ingested.clone()));
            }
            ThingEvent::Command(command) => effects.extend(of_command_event(command, now)),
            ThingEvent::Job(_) => jobs_changed = true,
            ThingEvent::Connected(_)
            | ThingEvent::Disconnected(_)
            | ThingEvent::Alarm(_)
            | ThingEvent::MeasurementsRecorded(_) => {}
        }
    }
    if jobs_changed && now.registration.is_some() {
        // The list and the head as they are now (the ones of each change are superseded).
        effects.push(jobs_notify(now, now_s));
        effects.push(jobs_notify_next(now, now_s));
    }
    if shadow_changed && now.registration.is_some() && now.shadow.exists {
        let (state, metadata) = now.shadow.delta();
        if !state.is_empty() {
            effects.push(Effect::Delta(Arc::new(serde_json::json!({
                "version": now.shadow.version,
                "timestamp": now_s,
                "state": state,
                "metadata": metadata,
            }))));
        }
    }
    effects
}

/// `jobs/notify` of the Thing as it is.
fn jobs_notify(state: &ThingState, timestamp_s: u64) -> Effect {
    let mut notify = state.jobs.notify_json();
    notify["timestamp"] = timestamp_s.into();
    Effect::JobsNotify(notify)
}

/// `jobs/notify-next` of the Thing as it is: the head with its document, or no `execution`.
fn jobs_notify_next(state: &ThingState, timestamp_s: u64) -> Effect {
    let mut next = serde_json::json!({ "timestamp": timestamp_s });
    if let Some(execution) = state
        .jobs
        .pending_view()
        .head()
        .and_then(|id| state.jobs.pending.get(id))
    {
        next["execution"] = execution.execution_json(&state.name, true);
    }
    Effect::JobsNotifyNext(next)
}

/// Whether recovering `events` needs the client id the Thing held before them: they delete it
/// without registering it first.
pub fn needs_client_id_before(events: &[ThingEvent]) -> bool {
    for event in events {
        match event {
            ThingEvent::Registered(_) => return false,
            ThingEvent::Deleted(_) => return true,
            _ => {}
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::thing::{
        apply, decide, CommandResponse, Limits, Origin, RegisterThing, SendCommand, ShadowUpdate,
        ThingCommand,
    };
    use serde_json::json;

    fn run(state: &mut ThingState, command: ThingCommand, now_ms: u64) -> (Decision, Vec<Effect>) {
        let decision = decide(state, &command, now_ms, &Limits::default()).expect("accepted");
        let jobs_before = state.jobs.pending_view();
        for event in &decision.events {
            apply(state, event);
        }
        let effects = of_decision(&decision, Some(&jobs_before), state);
        (decision, effects)
    }

    fn registered() -> ThingState {
        let mut state = ThingState::new("t1");
        run(
            &mut state,
            ThingCommand::Register(RegisterThing {
                mqtt_client_id: None,
                thing_type: None,
                attributes: Default::default(),
            }),
            1_000,
        );
        state
    }

    fn update(body: Value, origin: Origin) -> ThingCommand {
        ThingCommand::UpdateShadow {
            update: ShadowUpdate::from_json(&body, &Default::default()).expect("valid"),
            origin,
            want_documents: false,
        }
    }

    #[test]
    fn an_operator_desired_change_is_accepted_pushed_and_gives_a_delta() {
        let mut state = registered();
        let (_, effects) = run(
            &mut state,
            update(json!({"state":{"desired":{"speed":5}}}), Origin::Operator),
            2_000,
        );
        let kinds: Vec<&str> = effects
            .iter()
            .map(|e| match e {
                Effect::ShadowAccepted(_) => "accepted",
                Effect::DesiredPushed(_) => "desired",
                Effect::Delta(_) => "delta",
                _ => "other",
            })
            .collect();
        assert_eq!(kinds, ["accepted", "desired", "delta"]);
        // The device reporting the same value: accepted, no delta, nothing pushed.
        let (_, effects) = run(
            &mut state,
            update(json!({"state":{"reported":{"speed":5}}}), Origin::Device),
            3_000,
        );
        assert!(matches!(effects.as_slice(), [Effect::ShadowAccepted(_)]));
    }

    #[test]
    fn a_sent_command_is_requested_and_an_answer_announced() {
        let mut state = registered();
        let send = SendCommand::from_json(
            &json!({"action":"reboot","ttl":60}),
            "e1".into(),
            || "c1".into(),
            &Default::default(),
        )
        .expect("valid");
        let (_, effects) = run(&mut state, ThingCommand::SendCommand(send), 2_000);
        assert!(
            matches!(effects.as_slice(), [Effect::CommandRequested(e)] if e.execution_id == "e1")
        );
        let answer =
            CommandResponse::from_json("e1", &json!({"status":"SUCCEEDED"}), &Default::default())
                .expect("valid");
        let (_, effects) = run(&mut state, ThingCommand::RespondCommand(answer), 3_000);
        assert!(matches!(
            effects.as_slice(),
            [Effect::CommandAnswered {
                status: CommandStatus::Succeeded,
                ..
            }]
        ));
    }

    #[test]
    fn recovery_gives_each_events_effects_but_no_request_already_answered() {
        let mut state = registered();
        let mut events = Vec::new();
        for (id, ttl) in [("e1", 60), ("e2", 60)] {
            let send = SendCommand::from_json(
                &json!({"action":"reboot","ttl":ttl}),
                id.into(),
                || "c".into(),
                &Default::default(),
            )
            .expect("valid");
            events.extend(
                run(&mut state, ThingCommand::SendCommand(send), 2_000)
                    .0
                    .events,
            );
        }
        let answer =
            CommandResponse::from_json("e1", &json!({"status":"FAILED"}), &Default::default())
                .expect("valid");
        events.extend(
            run(&mut state, ThingCommand::RespondCommand(answer), 3_000)
                .0
                .events,
        );
        for speed in [5, 6] {
            events.extend(
                run(
                    &mut state,
                    update(
                        json!({"state":{"desired":{"speed":speed}}}),
                        Origin::Operator,
                    ),
                    4_000,
                )
                .0
                .events,
            );
        }
        let effects = for_recovery(&events, &state, None, 10);
        let names: Vec<&str> = effects.iter().map(Effect::name).collect();
        assert_eq!(
            names,
            [
                "command-requested",
                "command-answered",
                "shadow-accepted",
                "desired-pushed",
                "shadow-accepted",
                "desired-pushed",
                "delta"
            ]
        );
        assert!(matches!(&effects[0], Effect::CommandRequested(e) if e.execution_id == "e2"));
        assert!(
            matches!(&effects[3], Effect::DesiredPushed(d) if d["state"]["desired"]["speed"] == 5)
        );
        assert!(
            matches!(&effects[5], Effect::DesiredPushed(d) if d["state"]["desired"]["speed"] == 6)
        );
        assert!(matches!(&effects[6], Effect::Delta(d) if d["state"]["speed"] == 6));
    }

    #[test]
    fn recovery_of_a_deletion_closes_the_session_of_the_client_id_held_before() {
        let mut state = registered();
        let (deletion, _) = run(&mut state, ThingCommand::Delete, 2_000);
        assert!(needs_client_id_before(&deletion.events));
        let effects = for_recovery(&deletion.events, &state, Some("t1"), 10);
        assert_eq!(
            effects,
            [Effect::ThingDeleted {
                mqtt_client_id: "t1".into()
            }]
        );
        // Registered again since: the deletion is superseded, the registration is owed.
        let mut events = deletion.events.clone();
        events.extend(
            run(
                &mut state,
                ThingCommand::Register(RegisterThing {
                    mqtt_client_id: Some("t1-new".into()),
                    thing_type: None,
                    attributes: Default::default(),
                }),
                3_000,
            )
            .0
            .events,
        );
        let effects = for_recovery(&events, &state, Some("t1"), 10);
        assert_eq!(
            effects,
            [Effect::ThingRegistered {
                mqtt_client_id: "t1-new".into()
            }]
        );
    }
}
