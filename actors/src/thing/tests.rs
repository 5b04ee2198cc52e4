//! Given/when/then tests of the Thing aggregate, and the proptest laws of replay and merge.

use std::collections::BTreeMap;

use proptest::prelude::*;
use serde_json::{json, Map, Value};

use super::*;

const NOW_MS: u64 = 1_700_000_000_000;

fn register() -> ThingCommand {
    ThingCommand::Register(RegisterThing {
        mqtt_client_id: None,
        thing_type: Some("sensor".into()),
        attributes: BTreeMap::new(),
    })
}

fn report(body: Value) -> ThingCommand {
    ThingCommand::UpdateShadow {
        update: ShadowUpdate::from_json(&body, &ShadowLimits::default()).expect("valid"),
        origin: Origin::Device,
        want_documents: false,
    }
}

/// Runs `commands` from an empty state, requiring each to be accepted; returns state + events.
fn given(commands: &[ThingCommand]) -> (ThingState, Vec<ThingEvent>) {
    let mut state = ThingState::new("t1");
    let mut log = Vec::new();
    for command in commands {
        let decision = decide(&state, command, NOW_MS, &Limits::default()).expect("given accepted");
        for event in decision.events {
            apply(&mut state, &event);
            log.push(event);
        }
    }
    (state, log)
}

fn when(state: &ThingState, command: ThingCommand) -> Result<Decision, Rejection> {
    decide(state, &command, NOW_MS, &Limits::default())
}

#[test]
fn registering_twice_conflicts() {
    let (state, events) = given(&[register()]);
    assert_eq!(events.len(), 1);
    let description = state.describe().expect("registered");
    assert_eq!(
        description.mqtt_client_id, "t1",
        "client id defaults to the name"
    );
    let err = when(&state, register()).expect_err("conflict");
    assert_eq!(err.code(), ErrorCode::Conflict);
    assert_eq!(err.message, "Thing 't1' already exists");
}

#[test]
fn an_unregistered_thing_rejects_shadow_updates_with_404_and_the_token() {
    let (state, _) = given(&[]);
    let err = when(
        &state,
        report(json!({"state":{"reported":{"a":1}},"clientToken":"k"})),
    )
    .expect_err("not found");
    assert_eq!(err.code(), ErrorCode::NotFound);
    assert_eq!(err.client_token.as_deref(), Some("k"));
}

#[test]
fn deleting_a_thing_keeps_the_shadow_version_for_its_next_life() {
    let (state, _) = given(&[
        register(),
        report(json!({"state":{"reported":{"a":1}}})),
        ThingCommand::Delete,
        register(),
    ]);
    assert!(
        state.shadow.document().is_none(),
        "document went with the Thing"
    );
    let decision = when(&state, report(json!({"state":{"reported":{"a":2}}}))).expect("accepted");
    let Reply::ShadowUpdated(result) = decision.reply else {
        panic!("expected ShadowUpdated")
    };
    assert_eq!(result.version, 2, "versions never repeat");
}

#[test]
fn invalid_registrations_are_400() {
    let (state, _) = given(&[]);
    let mut attributes = BTreeMap::new();
    attributes.insert("bad key!".to_string(), "v".to_string());
    let err = when(
        &state,
        ThingCommand::Register(RegisterThing {
            mqtt_client_id: None,
            thing_type: None,
            attributes,
        }),
    )
    .expect_err("bad attribute");
    assert_eq!(err.code(), ErrorCode::BadRequest);
}

#[test]
fn thing_names_are_topic_and_url_safe() {
    for good in ["a", "thing-1", "site:42_b", &"x".repeat(128)] {
        assert!(validate_thing_name(good).is_ok(), "{good}");
    }
    for bad in ["", "a/b", "a+b", "#", "caf\u{e9}", "a b", &"x".repeat(129)] {
        assert_eq!(
            validate_thing_name(bad).expect_err(bad).code(),
            ErrorCode::BadRequest
        );
    }
}

#[test]
fn deleting_a_missing_shadow_is_404() {
    let (state, _) = given(&[register()]);
    let err = when(
        &state,
        ThingCommand::DeleteShadow {
            client_token: None,
            origin: Origin::Operator,
        },
    )
    .expect_err("no shadow");
    assert_eq!(err.message, "No shadow exists with name: 't1'");
}

#[test]
fn a_late_disconnect_of_a_taken_over_connection_does_not_mark_the_thing_offline() {
    let connected = |id| ThingCommand::RecordConnected {
        client_id: "dev".into(),
        connection_id: id,
    };
    let disconnected = |id, reason: &str| ThingCommand::RecordDisconnected {
        client_id: "dev".into(),
        connection_id: id,
        reason: reason.into(),
    };
    let (state, events) = given(&[
        register(),
        connected(1),
        connected(2),
        disconnected(1, "takeover"),
    ]);
    assert_eq!(events.len(), 4, "the stale disconnect is still recorded");
    let description = state.describe().expect("registered");
    assert!(description.online, "connection 2 is live");
    assert_eq!(description.last_disconnect_reason, None);

    let (state, _) = given(&[
        register(),
        connected(1),
        disconnected(1, "keepalive_timeout"),
    ]);
    let description = state.describe().expect("registered");
    assert!(!description.online);
    assert_eq!(
        description.last_disconnect_reason.as_deref(),
        Some("keepalive_timeout")
    );
    assert_eq!(description.last_seen_at_ms, Some(NOW_MS));
}

#[test]
fn lifecycle_of_an_unregistered_thing_is_404() {
    let (state, _) = given(&[]);
    let err = when(
        &state,
        ThingCommand::RecordConnected {
            client_id: "x".into(),
            connection_id: 1,
        },
    )
    .expect_err("not registered");
    assert_eq!(err.code(), ErrorCode::NotFound);
}

// ---- proptest laws ----

fn key() -> impl Strategy<Value = String> {
    prop_oneof![Just("a"), Just("b"), Just("c"), Just("d")].prop_map(String::from)
}

fn leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        (0i64..4).prop_map(Value::from),
        (0i64..4).prop_map(|n| Value::from(n as f64)),
        Just(Value::from(1.5)),
        any::<bool>().prop_map(Value::from),
        prop_oneof![Just("x"), Just("y")].prop_map(Value::from),
        prop::collection::vec((0i64..3).prop_map(Value::from), 0..3).prop_map(Value::Array),
    ]
}

/// Patch values: leaves, nulls (delete) and nested objects.
fn patch_value() -> impl Strategy<Value = Value> {
    let leaf_or_null = prop_oneof![4 => leaf(), 1 => Just(Value::Null)];
    leaf_or_null.prop_recursive(3, 24, 4, |inner| {
        prop::collection::btree_map(key(), inner, 0..4)
            .prop_map(|m| Value::Object(m.into_iter().collect()))
    })
}

fn patch_object() -> impl Strategy<Value = Value> {
    prop::collection::btree_map(key(), patch_value(), 0..4)
        .prop_map(|m| Value::Object(m.into_iter().collect::<Map<_, _>>()))
}

fn section() -> impl Strategy<Value = Option<Value>> {
    prop_oneof![3 => patch_object().prop_map(Some), 1 => Just(Some(Value::Null)), 1 => Just(None)]
}

fn command() -> impl Strategy<Value = ThingCommand> {
    prop_oneof![
        1 => Just(register()),
        1 => Just(ThingCommand::Delete),
        1 => Just(ThingCommand::DeleteShadow { client_token: None, origin: Origin::Operator }),
        1 => (1u64..4).prop_map(|id| ThingCommand::RecordConnected { client_id: "c".into(), connection_id: id }),
        1 => (1u64..4).prop_map(|id| ThingCommand::RecordDisconnected {
            client_id: "c".into(),
            connection_id: id,
            reason: "normal".into(),
        }),
        8 => (section(), section(), prop::option::of(0u64..6), any::<bool>()).prop_filter_map(
            "needs a section",
            |(desired, reported, version, operator)| {
                let mut state = Map::new();
                if let Some(d) = desired { state.insert("desired".into(), d); }
                if let Some(r) = reported { state.insert("reported".into(), r); }
                if state.is_empty() { return None; }
                let mut body = json!({"state": state});
                if let Some(v) = version { body["version"] = v.into(); }
                let update = ShadowUpdate::from_json(&body, &ShadowLimits::default()).ok()?;
                Some(ThingCommand::UpdateShadow {
                    update,
                    origin: if operator { Origin::Operator } else { Origin::Device },
                    want_documents: operator,
                })
            }
        ),
    ]
}

/// Runs commands live (decide then apply), keeping accepted events; rejections are skipped.
fn run_live(commands: &[ThingCommand]) -> (ThingState, Vec<ThingEvent>) {
    let mut state = ThingState::new("p");
    let mut log = Vec::new();
    for (i, command) in commands.iter().enumerate() {
        if let Ok(decision) = decide(
            &state,
            command,
            NOW_MS + i as u64 * 1000,
            &Limits::default(),
        ) {
            for event in decision.events {
                apply(&mut state, &event);
                log.push(event);
            }
        }
    }
    (state, log)
}

fn replay(events: &[ThingEvent]) -> ThingState {
    let mut state = ThingState::new("p");
    for event in events {
        apply(&mut state, event);
    }
    state
}

/// Independent definition: every desired leaf path has an equal value in reported.
fn every_desired_leaf_equals_reported(
    desired: &Map<String, Value>,
    reported: &Map<String, Value>,
) -> bool {
    desired
        .iter()
        .all(|(k, wanted)| match (wanted, reported.get(k)) {
            (Value::Object(w), Some(Value::Object(r))) => every_desired_leaf_equals_reported(w, r),
            (_, Some(have)) => shadow::json_eq(wanted, have),
            (_, None) => false,
        })
}

fn has_empty_object(map: &Map<String, Value>) -> bool {
    map.values().any(|v| match v {
        Value::Object(m) => m.is_empty() || has_empty_object(m),
        _ => false,
    })
}

proptest! {
    #[test]
    fn replaying_the_log_rebuilds_the_live_state(commands in prop::collection::vec(command(), 0..40)) {
        let (live, log) = run_live(&commands);
        prop_assert_eq!(replay(&log), live);
    }

    #[test]
    fn snapshot_plus_tail_equals_full_replay(
        commands in prop::collection::vec(command(), 0..40),
        split in 0usize..40,
    ) {
        let (_, log) = run_live(&commands);
        let split = split.min(log.len());
        let snapshot = replay(&log[..split]);
        let mut from_snapshot = snapshot.clone();
        for event in &log[split..] {
            apply(&mut from_snapshot, event);
        }
        prop_assert_eq!(from_snapshot, replay(&log));
    }

    #[test]
    fn delta_is_empty_iff_every_desired_leaf_equals_reported(
        commands in prop::collection::vec(command(), 0..40),
    ) {
        let (state, _) = run_live(&commands);
        let (delta, _) = state.shadow.delta();
        prop_assert_eq!(
            delta.is_empty(),
            every_desired_leaf_equals_reported(&state.shadow.desired, &state.shadow.reported)
        );
    }

    #[test]
    fn shadow_versions_strictly_increase_and_never_repeat(
        commands in prop::collection::vec(command(), 0..40),
    ) {
        let (_, log) = run_live(&commands);
        let mut last = 0u64;
        for event in &log {
            match event {
                ThingEvent::ShadowUpdated(updated) => {
                    prop_assert_eq!(updated.version, last + 1);
                    last = updated.version;
                }
                ThingEvent::ShadowDeleted(deleted) => prop_assert_eq!(deleted.version, last),
                _ => {}
            }
        }
    }

    #[test]
    fn stored_sections_never_hold_empty_objects_and_metadata_mirrors_data(
        commands in prop::collection::vec(command(), 0..40),
    ) {
        let (state, _) = run_live(&commands);
        let shadow = &state.shadow;
        prop_assert!(!has_empty_object(&shadow.desired));
        prop_assert!(!has_empty_object(&shadow.reported));
        prop_assert_eq!(
            shadow.desired.keys().collect::<Vec<_>>(),
            shadow.metadata_desired.keys().collect::<Vec<_>>()
        );
        prop_assert_eq!(
            shadow.reported.keys().collect::<Vec<_>>(),
            shadow.metadata_reported.keys().collect::<Vec<_>>()
        );
    }
}

#[test]
fn commands_need_a_registered_thing_but_deadlines_fire_even_after_deletion() {
    let send = ThingCommand::SendCommand(SendCommand {
        execution_id: "e1".into(),
        command_id: "c1".into(),
        action: "reboot".into(),
        params: None,
        ttl_s: Some(5),
    });
    let (state, _) = given(&[]);
    assert_eq!(
        when(&state, send.clone()).expect_err("404").code(),
        ErrorCode::NotFound
    );
    let (mut state, _) = given(&[register(), send, ThingCommand::Delete]);
    let decision = decide(
        &state,
        &ThingCommand::FireDeadlines,
        NOW_MS + 5_000,
        &Limits::default(),
    )
    .expect("fires");
    assert_eq!(decision.events.len(), 1);
    for event in &decision.events {
        apply(&mut state, event);
    }
    assert_eq!(state.commands.next_deadline_ms(), None);
    assert_eq!(
        state.commands.get("e1").map(|e| e.status),
        Some(CommandStatus::TimedOut)
    );
}
