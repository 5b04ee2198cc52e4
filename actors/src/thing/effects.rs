//! What a committed change causes for anyone but the requester waiting on its reply: the one
//! place that decides it, as pure functions of the events and the Thing's state.
//!
//! - [`of_decision`]: the effects of a change just made durable (the live path; the decision's
//!   reply already holds what was rendered while deciding: the accepted document, the delta).
//! - [`for_recovery`]: what a Thing still owes its device for events whose effects may not have
//!   been delivered (after a crash, or a straggler in the change feed): the requests of its
//!   pending commands, and its current desired state and delta. Duplicates are fine: every
//!   effect carries its version or execution id, so a device can drop a repeat.
//!
//! Effects name no topic: the sink (the MQTT frontend) renders them.
//!
//! Registrations and deletions are not owed again after a crash: the only state they act on
//! (MQTT sessions holding the client id) is verified against the registry when the stored
//! sessions are restored.

use serde_json::{Map, Value};

use super::commands::{CommandEvent, CommandStatus};
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
    /// A shadow update was accepted: its document (AWS `update/accepted`), for every listener.
    ShadowAccepted(Value),
    /// An operator changed desired: `{state:{desired}, version, timestamp}` for the device.
    DesiredPushed(Value),
    /// Desired differs from reported after the change: `{version, timestamp, state, metadata}`.
    Delta(Value),
    /// `{previous, current, timestamp, clientToken}` (rendered only when the sink wants them).
    Documents(Value),
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
        }
    }
}

/// The effects of `decision`, whose events are durable and applied (`after` is the state then).
pub fn of_decision(decision: &Decision, after: &ThingState) -> Vec<Effect> {
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
        // Command effects come from the events below (a time-out can ride along any command
        // decision); connection records cause nothing for anyone else yet.
        Reply::Command(_) | Reply::Recorded => {}
    }
    for event in decision.command_events() {
        match event {
            CommandEvent::Sent(sent) => {
                if let Some(execution) = after.commands.get(&sent.execution_id) {
                    effects.push(Effect::CommandRequested(Box::new(execution.clone())));
                }
            }
            CommandEvent::Responded(answer) => effects.push(Effect::CommandAnswered {
                execution_id: answer.execution_id.clone(),
                status: answer.status,
                at_ms: answer.at_ms,
            }),
            CommandEvent::TimedOut(finished) => effects.push(Effect::CommandEnded {
                execution_id: finished.execution_id.clone(),
                status: CommandStatus::TimedOut,
                at_ms: finished.at_ms,
            }),
            CommandEvent::Canceled(finished) => effects.push(Effect::CommandEnded {
                execution_id: finished.execution_id.clone(),
                status: CommandStatus::Canceled,
                at_ms: finished.at_ms,
            }),
            // A refused answer is the answering device's own reply, rendered by its frontend.
            CommandEvent::ResponseRefused(_) => {}
        }
    }
    effects
}

/// What the Thing, as it is `now`, still owes its device for `events` (see the module doc).
/// `now_s` stamps the re-rendered documents.
pub fn for_recovery(events: &[ThingEvent], now: &ThingState, now_s: u64) -> Vec<Effect> {
    let mut effects = Vec::new();
    let mut desired_changed = false;
    let mut shadow_changed = false;
    for event in events {
        match event {
            ThingEvent::Command(CommandEvent::Sent(sent)) => {
                if let Some(execution) = now
                    .commands
                    .get(&sent.execution_id)
                    .filter(|e| !e.status.is_terminal())
                {
                    effects.push(Effect::CommandRequested(Box::new(execution.clone())));
                }
            }
            ThingEvent::ShadowUpdated(update) => {
                shadow_changed = true;
                desired_changed |=
                    update.origin == super::Origin::Operator && update.desired.is_some();
            }
            ThingEvent::ShadowDeleted(_) => shadow_changed = true,
            _ => {}
        }
    }
    if now.registration.is_none() || !now.shadow.exists {
        return effects;
    }
    let shadow = &now.shadow;
    if desired_changed {
        let mut desired = Map::new();
        desired.insert("desired".into(), Value::Object(shadow.desired.clone()));
        effects.push(Effect::DesiredPushed(serde_json::json!({
            "state": desired,
            "version": shadow.version,
            "timestamp": now_s,
        })));
    }
    if shadow_changed {
        let (state, metadata) = shadow.delta();
        if !state.is_empty() {
            effects.push(Effect::Delta(serde_json::json!({
                "version": shadow.version,
                "timestamp": now_s,
                "state": state,
                "metadata": metadata,
            })));
        }
    }
    effects
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
        for event in &decision.events {
            apply(state, event);
        }
        let effects = of_decision(&decision, state);
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
    fn recovery_owes_pending_requests_and_the_current_desired_and_delta_only() {
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
        events.extend(
            run(
                &mut state,
                update(json!({"state":{"desired":{"speed":5}}}), Origin::Operator),
                4_000,
            )
            .0
            .events,
        );
        let effects = for_recovery(&events, &state, 10);
        assert_eq!(effects.len(), 3, "{effects:?}");
        assert!(matches!(&effects[0], Effect::CommandRequested(e) if e.execution_id == "e2"));
        assert!(
            matches!(&effects[1], Effect::DesiredPushed(d) if d["state"]["desired"]["speed"] == 5)
        );
        assert!(matches!(&effects[2], Effect::Delta(d) if d["state"]["speed"] == 5));
    }
}
