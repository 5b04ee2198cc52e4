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
        offline_rules: Vec::new(),
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

// ---- offline alarms ----

fn offline_rule(name: &str, offline_for_ms: u64) -> OfflineRule {
    OfflineRule {
        name: name.into(),
        offline_for_ms,
        severity: AlarmSeverity::Major,
    }
}

fn connect(id: u64) -> ThingCommand {
    ThingCommand::RecordConnected {
        client_id: "dev".into(),
        connection_id: id,
    }
}

fn disconnect(id: u64, rules: Vec<OfflineRule>) -> ThingCommand {
    ThingCommand::RecordDisconnected {
        client_id: "dev".into(),
        connection_id: id,
        reason: "keepalive_timeout".into(),
        offline_rules: rules,
    }
}

fn at(state: &mut ThingState, command: ThingCommand, now_ms: u64) -> Result<Decision, Rejection> {
    let decision = decide(state, &command, now_ms, &Limits::default())?;
    for event in &decision.events {
        apply(state, event);
    }
    Ok(decision)
}

fn fire(rules: Vec<OfflineRule>) -> ThingCommand {
    ThingCommand::FireDeadlines {
        offline_rules: rules,
        serving_since_ms: 0,
    }
}

#[test]
fn an_offline_rule_raises_its_alarm_when_the_deadline_passes_and_a_reconnect_clears_it() {
    let rules = vec![offline_rule("offline-1m", 60_000)];
    let (mut state, _) = given(&[register(), connect(1), disconnect(1, rules.clone())]);
    assert_eq!(state.next_deadline_ms(), Some(NOW_MS + 60_000), "watched");

    // Before the deadline: nothing.
    let early = at(&mut state, fire(rules.clone()), NOW_MS + 59_999).expect("fire");
    assert!(early.alarm_events().next().is_none());

    let raised = at(&mut state, fire(rules.clone()), NOW_MS + 60_000).expect("fire");
    let [AlarmEvent::Raised(event)] = raised.alarm_events().collect::<Vec<_>>()[..] else {
        panic!("one alarm raised: {:?}", raised.events);
    };
    assert_eq!(event.severity, AlarmSeverity::Major);
    assert_eq!(event.offline_since_ms, Some(NOW_MS));
    assert_eq!(
        state.next_deadline_ms(),
        None,
        "the watch ended with the alarm"
    );
    assert_eq!(
        state.alarms.alarms["offline-1m"].status,
        AlarmStatus::Active
    );

    // Firing again raises nothing new.
    let again = at(&mut state, fire(rules.clone()), NOW_MS + 120_000).expect("fire");
    assert!(again.events.is_empty());

    let back = at(&mut state, connect(2), NOW_MS + 130_000).expect("connect");
    assert!(matches!(
        back.alarm_events().collect::<Vec<_>>()[..],
        [AlarmEvent::Cleared(_)]
    ));
    let alarm = &state.alarms.alarms["offline-1m"];
    assert_eq!(alarm.status, AlarmStatus::Cleared);
    assert_eq!(alarm.cleared_reason.as_deref(), Some("reconnected"));
}

#[test]
fn a_thing_back_before_the_deadline_gets_no_alarm() {
    let rules = vec![offline_rule("offline-1m", 60_000)];
    let (mut state, _) = given(&[register(), connect(1), disconnect(1, rules.clone())]);
    let back = at(&mut state, connect(2), NOW_MS + 1_000).expect("connect");
    assert!(matches!(
        back.alarm_events().collect::<Vec<_>>()[..],
        [AlarmEvent::Disarmed(_)]
    ));
    assert_eq!(state.next_deadline_ms(), None);
    // A stale fire (the index entry outlived the watch) finds nothing to do.
    let stale = at(&mut state, fire(rules), NOW_MS + 60_000).expect("fire");
    assert!(stale.events.is_empty());
}

#[test]
fn a_late_disconnect_of_a_taken_over_connection_starts_no_watch() {
    let rules = vec![offline_rule("offline-1m", 60_000)];
    let (state, _) = given(&[register(), connect(1), connect(2), disconnect(1, rules)]);
    assert!(state.connection.online);
    assert_eq!(state.next_deadline_ms(), None);
}

#[test]
fn a_rule_gone_when_the_deadline_fires_raises_nothing() {
    let rules = vec![offline_rule("offline-1m", 60_000)];
    let (mut state, _) = given(&[register(), connect(1), disconnect(1, rules)]);
    let fired = at(&mut state, fire(Vec::new()), NOW_MS + 60_000).expect("fire");
    assert!(matches!(
        fired.alarm_events().collect::<Vec<_>>()[..],
        [AlarmEvent::Disarmed(_)]
    ));
    assert!(state.alarms.alarms.is_empty());
    assert_eq!(state.next_deadline_ms(), None);
}

#[test]
fn a_rule_created_while_the_thing_is_offline_counts_from_when_it_went_offline() {
    let (mut state, _) = given(&[register(), connect(1), disconnect(1, Vec::new())]);
    let rules = vec![offline_rule("offline-1m", 60_000)];
    let armed = at(
        &mut state,
        ThingCommand::ArmOfflineAlarms {
            offline_rules: rules.clone(),
        },
        NOW_MS + 5_000,
    )
    .expect("arm");
    assert_eq!(armed.events.len(), 1);
    assert_eq!(state.next_deadline_ms(), Some(NOW_MS + 60_000));
    // Asked again (a resumed sweep): nothing new.
    let again = when(
        &state,
        ThingCommand::ArmOfflineAlarms {
            offline_rules: rules,
        },
    )
    .expect("arm");
    assert!(again.events.is_empty());

    // Never connected, or online: not watched.
    let (fresh, _) = given(&[register()]);
    let (online, _) = given(&[register(), connect(1)]);
    for state in [fresh, online] {
        let decision = when(
            &state,
            ThingCommand::ArmOfflineAlarms {
                offline_rules: vec![offline_rule("offline-1m", 60_000)],
            },
        )
        .expect("arm");
        assert!(decision.events.is_empty());
    }
}

#[test]
fn an_operator_acknowledges_then_clears_an_alarm() {
    let rules = vec![offline_rule("offline-1m", 60_000)];
    let (mut state, _) = given(&[register(), connect(1), disconnect(1, rules.clone())]);
    at(&mut state, fire(rules), NOW_MS + 60_000).expect("fire");
    let ack = |by: &str| ThingCommand::AcknowledgeAlarm {
        alarm_type: "offline-1m".into(),
        by: by.into(),
    };
    let acknowledged = at(&mut state, ack("ops"), NOW_MS + 61_000).expect("ack");
    let Reply::Alarm(Some(alarm)) = &acknowledged.reply else {
        panic!("{:?}", acknowledged.reply);
    };
    assert_eq!(alarm.status, AlarmStatus::Acknowledged);
    assert_eq!(alarm.acknowledged_by.as_deref(), Some("ops"));
    assert!(
        when(&state, ack("other")).expect("again").events.is_empty(),
        "idempotent"
    );

    let clear = ThingCommand::ClearAlarm {
        alarm_type: "offline-1m".into(),
        by: "ops".into(),
    };
    at(&mut state, clear.clone(), NOW_MS + 62_000).expect("clear");
    assert_eq!(
        state.alarms.alarms["offline-1m"].status,
        AlarmStatus::Cleared
    );
    assert!(when(&state, clear).expect("again").events.is_empty());
    let err = when(&state, ack("ops")).expect_err("cleared");
    assert_eq!(err.code(), ErrorCode::Conflict);
    let err = when(
        &state,
        ThingCommand::AcknowledgeAlarm {
            alarm_type: "nope".into(),
            by: "ops".into(),
        },
    )
    .expect_err("unknown");
    assert_eq!(err.code(), ErrorCode::NotFound);
}

#[test]
fn time_the_server_was_down_does_not_count_and_the_rule_as_it_is_now_decides() {
    let rules = vec![offline_rule("offline-1m", 60_000)];
    let (mut state, _) = given(&[register(), connect(1), disconnect(1, rules.clone())]);
    // The server came back at +10 min: the Thing gets a minute from then.
    let restarted = NOW_MS + 600_000;
    let fire_after = |rules| ThingCommand::FireDeadlines {
        offline_rules: rules,
        serving_since_ms: restarted,
    };
    let moved = at(&mut state, fire_after(rules.clone()), restarted + 1).expect("fire");
    assert!(moved
        .alarm_events()
        .all(|e| matches!(e, AlarmEvent::Armed(_))));
    assert_eq!(state.next_deadline_ms(), Some(restarted + 60_000));
    assert!(state.alarms.alarms.is_empty());
    let raised = at(&mut state, fire_after(rules), restarted + 60_000).expect("fire");
    let [AlarmEvent::Raised(event)] = raised.alarm_events().collect::<Vec<_>>()[..] else {
        panic!("{:?}", raised.events);
    };
    assert_eq!(
        event.offline_since_ms,
        Some(NOW_MS),
        "offline since the disconnect"
    );

    // A rule re-created with a longer time moves a watch armed under the old one.
    let (mut state, _) = given(&[
        register(),
        connect(1),
        disconnect(1, vec![offline_rule("r", 1_000)]),
    ]);
    let longer = vec![offline_rule("r", 120_000)];
    at(&mut state, fire(longer.clone()), NOW_MS + 1_000).expect("fire");
    assert_eq!(state.next_deadline_ms(), Some(NOW_MS + 120_000));
    assert!(state.alarms.alarms.is_empty());
}

#[test]
fn a_cleared_alarm_is_not_raised_again_for_the_same_offline_period() {
    let rules = vec![offline_rule("offline-1m", 60_000)];
    let (mut state, _) = given(&[register(), connect(1), disconnect(1, rules.clone())]);
    at(&mut state, fire(rules.clone()), NOW_MS + 60_000).expect("fire");
    at(
        &mut state,
        ThingCommand::ClearAlarm {
            alarm_type: "offline-1m".into(),
            by: "ops".into(),
        },
        NOW_MS + 61_000,
    )
    .expect("clear");
    // A sweep asks again (resumed after a crash, or the rule re-created): nothing.
    let again = at(
        &mut state,
        ThingCommand::ArmOfflineAlarms {
            offline_rules: rules.clone(),
        },
        NOW_MS + 62_000,
    )
    .expect("arm");
    assert!(again.events.is_empty());
    // The next offline period is watched again.
    at(&mut state, connect(2), NOW_MS + 70_000).expect("connect");
    let watched = at(&mut state, disconnect(2, rules), NOW_MS + 80_000).expect("disconnect");
    assert_eq!(watched.alarm_events().count(), 1);
}

#[test]
fn a_device_alarm_is_one_per_type_its_severity_changes_and_it_clears() {
    let (mut state, _) = given(&[register()]);
    let raise = |text: &str| ThingCommand::RaiseAlarm {
        alarm_type: "c8y_Overheat".into(),
        severity: AlarmSeverity::Major,
        text: Some(text.into()),
    };
    let raised = at(&mut state, raise("hot"), NOW_MS).expect("raise");
    assert_eq!(raised.events.len(), 1);
    assert!(at(&mut state, raise("hotter"), NOW_MS + 1)
        .expect("again")
        .events
        .is_empty());
    let change = |severity| ThingCommand::ChangeAlarmSeverity {
        alarm_type: "c8y_Overheat".into(),
        severity,
    };
    at(&mut state, change(AlarmSeverity::Critical), NOW_MS + 2).expect("change");
    assert_eq!(
        state.alarms.alarms["c8y_Overheat"].severity,
        AlarmSeverity::Critical
    );
    assert!(when(&state, change(AlarmSeverity::Critical))
        .expect("same")
        .events
        .is_empty());
    // A reconnect does not clear a device's alarm (only offline ones).
    at(&mut state, connect(1), NOW_MS + 3).expect("connect");
    assert_eq!(
        state.alarms.alarms["c8y_Overheat"].status,
        AlarmStatus::Active
    );
    let long = "x".repeat(alarms::ALARM_TEXT_BYTES_MAX + 1);
    let other = ThingCommand::RaiseAlarm {
        alarm_type: "c8y_Other".into(),
        severity: AlarmSeverity::Minor,
        text: Some(long),
    };
    assert_eq!(
        when(&state, other).expect_err("long").code(),
        ErrorCode::BadRequest
    );

    // Ever new types are bounded.
    let (mut state, _) = given(&[register()]);
    for n in 0..alarms::ALARM_TYPES_MAX {
        let raise = ThingCommand::RaiseAlarm {
            alarm_type: format!("t{n}"),
            severity: AlarmSeverity::Minor,
            text: None,
        };
        at(&mut state, raise, NOW_MS).expect("within the bound");
    }
    let one_more = ThingCommand::RaiseAlarm {
        alarm_type: "t-new".into(),
        severity: AlarmSeverity::Minor,
        text: None,
    };
    assert_eq!(
        when(&state, one_more).expect_err("past the bound").code(),
        ErrorCode::TooManyRequests
    );
}

#[test]
fn a_device_cannot_raise_change_or_clear_the_servers_offline_alarm() {
    let rules = vec![offline_rule("offline-1m", 60_000)];
    let (mut state, _) = given(&[register(), connect(1), disconnect(1, rules.clone())]);
    let raise = ThingCommand::RaiseAlarm {
        alarm_type: "offline-1m".into(),
        severity: AlarmSeverity::Warning,
        text: None,
    };
    assert!(
        when(&state, raise.clone()).is_err(),
        "watched: not the device's"
    );
    at(&mut state, fire(rules.clone()), NOW_MS + 60_000).expect("fire");
    let clear = ThingCommand::ClearDeviceAlarm {
        alarm_type: "offline-1m".into(),
    };
    assert!(when(&state, clear).is_err());
    let change = ThingCommand::ChangeAlarmSeverity {
        alarm_type: "offline-1m".into(),
        severity: AlarmSeverity::Warning,
    };
    assert!(when(&state, change).is_err());
    assert!(when(&state, raise).is_err());

    // A device alarm of a rule's type does not stop the rule's watch.
    let (mut state, _) = given(&[register(), connect(1)]);
    at(
        &mut state,
        ThingCommand::RaiseAlarm {
            alarm_type: "offline-1m".into(),
            severity: AlarmSeverity::Warning,
            text: None,
        },
        NOW_MS,
    )
    .expect("device alarm");
    let watched = at(&mut state, disconnect(1, rules), NOW_MS + 1).expect("disconnect");
    assert_eq!(watched.alarm_events().count(), 1, "armed anyway");
}

#[test]
fn deleting_a_thing_ends_its_watches_and_a_new_registration_starts_clean() {
    let rules = vec![
        offline_rule("offline-1m", 60_000),
        offline_rule("offline-1h", 3_600_000),
    ];
    let (mut state, _) = given(&[register(), connect(1), disconnect(1, rules.clone())]);
    at(&mut state, fire(rules), NOW_MS + 60_000).expect("fire");
    let deleted = at(&mut state, ThingCommand::Delete, NOW_MS + 61_000).expect("delete");
    assert_eq!(
        deleted.alarm_events().count(),
        2,
        "one disarmed, one cleared"
    );
    assert_eq!(state.next_deadline_ms(), None);
    at(&mut state, register(), NOW_MS + 62_000).expect("register");
    assert!(state.alarms.alarms.is_empty());

    // Deleted while connected: the connection ends with it, so a new registration is offline.
    let (mut state, _) = given(&[register(), connect(1)]);
    let deleted = at(&mut state, ThingCommand::Delete, NOW_MS + 1_000).expect("delete");
    assert!(
        matches!(deleted.events[0], ThingEvent::Disconnected(ref d) if d.reason == "thing_deleted")
    );
    at(&mut state, register(), NOW_MS + 2_000).expect("register");
    assert!(!state.describe().expect("registered").online);
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
            offline_rules: vec![offline_rule("now", 0)],
        }),
        1 => Just(ThingCommand::FireDeadlines { offline_rules: vec![offline_rule("now", 0)], serving_since_ms: 0 }),
        1 => Just(ThingCommand::AcknowledgeAlarm { alarm_type: "now".into(), by: "ops".into() }),
        1 => Just(ThingCommand::ClearAlarm { alarm_type: "now".into(), by: "ops".into() }),
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
        if let Ok(mut decision) = decide(
            &state,
            command,
            NOW_MS + i as u64 * 1000,
            &Limits::default(),
        ) {
            // As the actor does: the replay law then checks that it agrees with `apply`.
            apply_decision(&mut state, &mut decision);
            log.extend(decision.events);
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

/// `update/accepted` built as a JSON map, as it was before it was serialized straight from the
/// event: `accepted_of` must print exactly this.
fn accepted_as_json_map(event: &shadow::ShadowUpdated) -> Value {
    let mut state = Map::new();
    let mut metadata = Map::new();
    for (name, patch) in [("desired", &event.desired), ("reported", &event.reported)] {
        if let Some(patch) = patch {
            state.insert(name.into(), patch.to_json());
            let meta = match patch {
                shadow::SectionPatch::Clear => Value::Null,
                shadow::SectionPatch::Merge(map) => {
                    Value::Object(metadata_as_json_map(map, event.timestamp_s))
                }
            };
            metadata.insert(name.into(), meta);
        }
    }
    let mut accepted = Map::new();
    accepted.insert("state".into(), Value::Object(state));
    accepted.insert("metadata".into(), Value::Object(metadata));
    accepted.insert("version".into(), event.version.into());
    accepted.insert("timestamp".into(), event.timestamp_s.into());
    if let Some(token) = &event.client_token {
        accepted.insert("clientToken".into(), token.clone().into());
    }
    Value::Object(accepted)
}

/// The metadata of a patch as a JSON map: its shape, every leaf `{"timestamp": stamp}`.
fn metadata_as_json_map(patch: &Map<String, Value>, stamp: u64) -> Map<String, Value> {
    patch
        .iter()
        .map(|(key, value)| {
            let meta = match value {
                Value::Object(child) => Value::Object(metadata_as_json_map(child, stamp)),
                _ => json!({ "timestamp": stamp }),
            };
            (key.clone(), meta)
        })
        .collect()
}

proptest! {
    #[test]
    fn accepted_text_is_the_json_map_printed(
        desired in section(),
        reported in section(),
        token in prop::option::of("[a-z\"\\\\]{0,4}"),
        version in 1u64..9,
    ) {
        let mut state = Map::new();
        if let Some(d) = desired { state.insert("desired".into(), d); }
        if let Some(r) = reported { state.insert("reported".into(), r); }
        let mut body = json!({"state": state});
        if let Some(token) = &token { body["clientToken"] = token.clone().into(); }
        if let Ok(update) = ShadowUpdate::from_json(&body, &ShadowLimits::default()) {
            let event = shadow::ShadowUpdated {
                desired: update.desired,
                reported: update.reported,
                version,
                timestamp_s: 1_700_000_000,
                client_token: update.client_token,
                origin: Origin::Device,
                delta: None,
            };
            let printed = serde_json::to_string(&accepted_as_json_map(&event)).expect("JSON");
            prop_assert_eq!(&*shadow::accepted_of(&event), printed.as_str());
        }
    }

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
    fn a_snapshot_decodes_to_the_state_it_was_taken_from(
        commands in prop::collection::vec(command(), 0..40),
    ) {
        // Through the stored bytes: the shadow's metadata is compact in memory and rendered in
        // snapshots, so this is where the two forms must agree.
        let (state, _) = run_live(&commands);
        let stored = crate::codec::encode_state(&state, 0).expect("encode");
        let decoded = crate::codec::decode_state(&state.name, &stored).expect("decode");
        prop_assert_eq!(decoded, state);
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
        &ThingCommand::FireDeadlines {
            offline_rules: Vec::new(),
            serving_since_ms: 0,
        },
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

// ---- a required interval (Cumulocity 117): watched on data, not on the connection ----

fn interval_minutes(minutes: u64) -> ThingCommand {
    report(
        json!({"state": {"reported": {"c8y_RequiredAvailability": {"responseInterval": minutes}}}}),
    )
}

const UNAVAILABLE: &str = alarms::REQUIRED_AVAILABILITY_ALARM;

#[test]
fn a_device_silent_past_its_required_interval_is_alarmed_and_its_next_data_clears_it() {
    // Given a device whose 117 sets 5 minutes
    let (mut state, log) = given(&[register(), connect(1), interval_minutes(5)]);
    assert!(
        matches!(log.last(), Some(ThingEvent::Alarm(AlarmEvent::Armed(a))) if a.due_at_ms == NOW_MS + 300_000),
        "{log:?}"
    );
    // When it sends data often, each message costs no alarm event
    let data = at(
        &mut state,
        report(json!({"state": {"reported": {"t": 1}}})),
        NOW_MS + 120_000,
    )
    .expect("data");
    assert_eq!(data.alarm_events().count(), 0);
    // Then its deadline waits again from the last data instead of raising
    let fired = at(&mut state, fire(Vec::new()), NOW_MS + 300_000).expect("fire");
    let [AlarmEvent::Armed(again)] = fired.alarm_events().collect::<Vec<_>>()[..] else {
        panic!("waits again: {:?}", fired.events);
    };
    assert_eq!(
        again.due_at_ms,
        NOW_MS + 120_000 + 300_000,
        "from the last data"
    );
    // When it stays silent that long, connected or not, the alarm is raised
    let raised = at(&mut state, fire(Vec::new()), again.due_at_ms).expect("fire");
    let [AlarmEvent::Raised(alarm)] = raised.alarm_events().collect::<Vec<_>>()[..] else {
        panic!("raised: {:?}", raised.events);
    };
    assert!(state.connection.online, "silent while connected");
    assert_eq!(alarm.alarm_type, UNAVAILABLE);
    assert_eq!(alarm.severity, AlarmSeverity::Major);
    assert!(
        alarm.text.contains("required interval 5 min"),
        "{}",
        alarm.text
    );
    // A reconnect is no data: the alarm stays
    let (back, _) = (
        at(&mut state, connect(2), again.due_at_ms + 1).expect("connect"),
        (),
    );
    assert_eq!(back.alarm_events().count(), 0);
    assert_eq!(state.alarms.alarms[UNAVAILABLE].status, AlarmStatus::Active);
    // An event is data: the alarm clears and the watch starts again
    let event = IngestEvent::from_json(
        &json!({"eventType": "boot", "severity": "info", "data": {}}),
        None,
        &EventLimits::default(),
    )
    .expect("event");
    let now = again.due_at_ms + 10;
    let cleared = at(&mut state, ThingCommand::IngestEvent(event), now).expect("event");
    assert!(matches!(
        cleared.alarm_events().collect::<Vec<_>>()[..],
        [AlarmEvent::Cleared(c), AlarmEvent::Armed(a)]
            if c.reason == "data received" && a.due_at_ms == now + 300_000
    ));
    assert_eq!(
        state.alarms.alarms[UNAVAILABLE].status,
        AlarmStatus::Cleared
    );
}

#[test]
fn a_disconnect_does_not_watch_the_required_interval_and_removing_it_ends_the_watch() {
    let (mut state, _) = given(&[register(), connect(1), interval_minutes(1)]);
    // A disconnect with no fleet rules starts no other watch
    let gone = at(&mut state, disconnect(1, Vec::new()), NOW_MS + 1_000).expect("disconnect");
    assert_eq!(gone.alarm_events().count(), 0);
    // 0 minutes is no interval: the watch ends
    let none = at(&mut state, interval_minutes(0), NOW_MS + 2_000).expect("0: none");
    assert!(matches!(
        none.alarm_events().collect::<Vec<_>>()[..],
        [AlarmEvent::Disarmed(_)]
    ));
    assert_eq!(state.next_deadline_ms(), None);
    // And removing the fragment ends the watch: its deadline has nothing to do
    let (mut state, _) = given(&[register(), interval_minutes(1)]);
    let cleared = at(
        &mut state,
        report(json!({"state": {"reported": {"c8y_RequiredAvailability": null}}})),
        NOW_MS + 1,
    )
    .expect("removed");
    assert!(matches!(
        cleared.alarm_events().collect::<Vec<_>>()[..],
        [AlarmEvent::Disarmed(_)]
    ));
    let fired = at(&mut state, fire(Vec::new()), NOW_MS + 60_000).expect("fire");
    assert!(fired.events.is_empty());
    assert!(state.alarms.alarms.is_empty());
}

#[test]
fn the_required_interval_watch_outlives_reconnects_merged_patches_and_repeated_alarm_rows() {
    let (mut state, _) = given(&[register(), connect(1), interval_minutes(5)]);
    let armed = state.next_deadline_ms();
    assert_eq!(armed, Some(NOW_MS + 300_000));
    // A reconnect ends offline watches, not this one
    at(&mut state, disconnect(1, Vec::new()), NOW_MS + 1).expect("disconnect");
    let back = at(&mut state, connect(2), NOW_MS + 2).expect("connect");
    assert_eq!(back.alarm_events().count(), 0);
    assert_eq!(state.next_deadline_ms(), armed);
    // A patch that merges into the fragment without its interval keeps the interval
    let other = report(json!({"state": {"reported": {"c8y_RequiredAvailability": {"note": "x"}}}}));
    let merged = at(&mut state, other, NOW_MS + 3).expect("merge");
    assert_eq!(merged.alarm_events().count(), 0, "{:?}", merged.events);
    assert_eq!(state.required_interval_ms(), Some(300_000));
    // A device alarm row that changes nothing is no data on either side of the log
    let raise = || ThingCommand::RaiseAlarm {
        alarm_type: "c8y_Fault".into(),
        severity: AlarmSeverity::Minor,
        text: None,
    };
    at(&mut state, raise(), NOW_MS + 4).expect("raise");
    let fired = at(&mut state, fire(Vec::new()), NOW_MS + 300_000).expect("fire");
    assert!(matches!(
        fired.alarm_events().collect::<Vec<_>>()[..],
        [AlarmEvent::Armed(a)] if a.due_at_ms == NOW_MS + 4 + 300_000
    ));
    let due = NOW_MS + 4 + 300_000;
    let raised = at(&mut state, fire(Vec::new()), due).expect("fire");
    assert!(matches!(
        raised.alarm_events().collect::<Vec<_>>()[..],
        [AlarmEvent::Raised(_)]
    ));
    let repeated = at(&mut state, raise(), due + 1).expect("repeat");
    assert!(repeated.events.is_empty(), "{:?}", repeated.events);
    assert_eq!(state.alarms.alarms[UNAVAILABLE].status, AlarmStatus::Active);
    // And the replayed log rebuilds the same state the decisions saw
    let replayed = {
        let mut replayed = ThingState::new("t1");
        let (_, log) = given(&[register(), connect(1), interval_minutes(5)]);
        for event in &log {
            apply(&mut replayed, event);
        }
        replayed
    };
    assert_eq!(replayed.last_data_at_ms, Some(NOW_MS));
}
