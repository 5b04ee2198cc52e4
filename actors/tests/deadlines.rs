//! The deadline timer with real actors and storage, on a manual clock: deadlines fire at their
//! time, activate passivated Things, survive a restart, and stale index entries are cleaned up.

use std::sync::Arc;
use std::time::{Duration, Instant};

use thinghub_actors::clock::ManualClock;
use thinghub_actors::context::DeadlineWake;
use thinghub_actors::deadlines::DeadlineConfig;
use thinghub_actors::thing::{
    CommandExecution, CommandOutcome, CommandStatus, Limits, RegisterThing, Reply, SendCommand,
    ThingCommand,
};
use thinghub_actors::{Node, NodeConfig, Registry, Request, Response, ThingContext};
use thinghub_storage::{IndexOp, Store, StoreConfig};

const T0: u64 = 1_700_000_000_000;

async fn start(store: &Store, clock: Arc<ManualClock>) -> Node {
    let context = Arc::new(ThingContext {
        store: store.clone(),
        clock,
        limits: Limits::default(),
        snapshot_every_events: 500,
        deadlines: DeadlineWake::new(),
        outbox: thinghub_actors::outbox::Outbox::without_frontend(store).expect("outbox"),
        counters: Default::default(),
        alarm_rules: Default::default(),
    });
    let config = NodeConfig {
        deadlines: DeadlineConfig {
            // The clock is manual: rescan often so an advance is seen quickly.
            scan_interval_max_ms: 10,
            retry_after_ms: 10,
            ..DeadlineConfig::default()
        },
        ..NodeConfig::default()
    };
    Node::start(context, config).await.expect("node")
}

async fn register(registry: &Registry, name: &str) {
    registry
        .request(
            name,
            Request::Command(ThingCommand::Register(RegisterThing {
                mqtt_client_id: None,
                thing_type: None,
                attributes: Default::default(),
            })),
        )
        .await
        .expect("register");
}

async fn send(registry: &Registry, name: &str, id: &str, ttl_s: u64) -> CommandExecution {
    let command = SendCommand {
        execution_id: id.into(),
        command_id: "c".into(),
        action: "reboot".into(),
        params: None,
        ttl_s: Some(ttl_s),
    };
    match registry
        .request(name, Request::Command(ThingCommand::SendCommand(command)))
        .await
        .expect("send")
    {
        Response::Decided(Reply::Command(CommandOutcome::Execution(e))) => *e,
        other => panic!("unexpected {other:?}"),
    }
}

async fn status(registry: &Registry, name: &str, id: &str) -> CommandStatus {
    let request = Request::GetCommand {
        execution_id: id.into(),
    };
    match registry.request(name, request).await.expect("get") {
        Response::Execution(e) => e.status,
        other => panic!("unexpected {other:?}"),
    }
}

/// Polls (bounded) until the execution has `want`.
async fn wait_for(registry: &Registry, name: &str, id: &str, want: CommandStatus) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now = status(registry, name, id).await;
        if now == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{name}/{id} stayed {now:?}, expected {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Polls `done` (bounded: 5 s) until it holds; fails naming `what` otherwise.
async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !done() {
        assert!(Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A store in a temporary dir, a manual clock at T0, and a registry on them.
async fn setup() -> (tempfile::TempDir, Store, Arc<ManualClock>, Node) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(&StoreConfig::new(dir.path())).expect("open");
    let clock = ManualClock::new(T0);
    let node = start(&store, clock.clone()).await;
    (dir, store, clock, node)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadline_fires_at_its_time_and_not_before() {
    let (_dir, store, clock, node) = setup().await;
    let registry = node.registry().clone();
    register(&registry, "t1").await;
    let execution = send(&registry, "t1", "e1", 30).await;
    assert!(store
        .has_deadline("t1", execution.expires_at_ms)
        .expect("index"));

    clock.advance_ms(29_999);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(status(&registry, "t1", "e1").await, CommandStatus::Sent);

    clock.advance_ms(1);
    wait_for(&registry, "t1", "e1", CommandStatus::TimedOut).await;
    // The index entry goes once nothing is pending.
    wait_until("deadline entry was not removed", || {
        store.count_deadlines() == 0
    })
    .await;
    assert_eq!(registry.deadline_stats().timed_out, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_passivated_thing_is_activated_by_its_deadline() {
    let (_dir, store, clock, node) = setup().await;
    let registry = node.registry().clone();
    register(&registry, "sleepy").await;
    send(&registry, "sleepy", "e1", 5).await;
    send(&registry, "sleepy", "e2", 10).await;
    registry.passivate_idle(Duration::ZERO);
    wait_until("did not passivate", || registry.stats().active_things == 0).await;
    let activations = registry.stats().activations;
    clock.advance_ms(5_000);
    wait_until("deadline did not fire", || {
        registry.deadline_stats().timed_out >= 1
    })
    .await;
    assert!(registry.stats().activations > activations, "re-activated");
    assert_eq!(
        status(&registry, "sleepy", "e1").await,
        CommandStatus::TimedOut
    );
    assert_eq!(status(&registry, "sleepy", "e2").await, CommandStatus::Sent);
    // The next deadline is now the Thing's one entry.
    assert!(store.has_deadline("sleepy", T0 + 10_000).expect("index"));
    assert_eq!(store.count_deadlines(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadlines_that_passed_while_down_fire_right_after_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = ManualClock::new(T0);
    {
        let store = Store::open(&StoreConfig::new(dir.path())).expect("open");
        let node = start(&store, clock.clone()).await;
        let registry = node.registry().clone();
        register(&registry, "t1").await;
        send(&registry, "t1", "e1", 60).await;
        node.shutdown(Duration::from_secs(5))
            .await
            .expect("shutdown");
    }
    // "Down" for two minutes.
    clock.advance_ms(120_000);
    let store = Store::reopen_in_process(&StoreConfig::new(dir.path())).expect("reopen");
    let node = start(&store, clock.clone()).await;
    let registry = node.registry().clone();
    wait_until("no fire after restart", || {
        registry.deadline_stats().timed_out >= 1
    })
    .await;
    assert_eq!(status(&registry, "t1", "e1").await, CommandStatus::TimedOut);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_index_entry_fires_changes_nothing_and_is_removed() {
    let (_dir, store, clock, node) = setup().await;
    let registry = node.registry().clone();
    register(&registry, "t1").await;
    send(&registry, "t1", "e1", 60).await;
    // As if a crash left an entry behind (the entry is written before its events).
    store
        .repair_index("t1", &[IndexOp::PutDeadline { at_ms: T0 + 1 }])
        .expect("stray entry");
    registry.context().deadlines.scheduled(T0 + 1);
    clock.advance_ms(10);
    wait_until("stale entry not removed", || {
        !store.has_deadline("t1", T0 + 1).expect("index")
    })
    .await;
    assert_eq!(status(&registry, "t1", "e1").await, CommandStatus::Sent);
    assert!(store.has_deadline("t1", T0 + 60_000).expect("index"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn activation_restores_a_missing_deadline_entry() {
    let (_dir, store, _clock, node) = setup().await;
    let registry = node.registry().clone();
    register(&registry, "t1").await;
    send(&registry, "t1", "e1", 60).await;
    registry.passivate_idle(Duration::ZERO);
    store
        .repair_index("t1", &[IndexOp::RemoveDeadline { at_ms: T0 + 60_000 }])
        .expect("lose entry");
    // Any request re-activates the Thing, which repairs its entry.
    assert_eq!(status(&registry, "t1", "e1").await, CommandStatus::Sent);
    assert!(store.has_deadline("t1", T0 + 60_000).expect("index"));
}

/// A Cumulocity device's required interval (117, `c8y_RequiredAvailability` in the shadow's
/// reported) is watched on its data through the durable deadline index: silent that long,
/// even while connected, it gets `c8y_UnavailabilityAlarm`; its next data clears it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_required_interval_raises_an_unavailability_alarm_when_the_device_stays_silent() {
    use thinghub_actors::thing::{AlarmStatus, Origin, ShadowLimits, ShadowUpdate, ThingState};
    let (_dir, _store, clock, node) = setup().await;
    let registry = node.registry().clone();
    register(&registry, "pump").await;
    let report = |body: serde_json::Value| {
        Request::Command(ThingCommand::UpdateShadow {
            update: ShadowUpdate::from_json(&body, &ShadowLimits::default()).expect("update"),
            origin: Origin::Device,
            want_documents: false,
        })
    };
    let command = |c| Request::Command(c);
    registry
        .request(
            "pump",
            command(ThingCommand::RecordConnected {
                client_id: "pump".into(),
                connection_id: 1,
            }),
        )
        .await
        .expect("connected");
    registry
        .request(
            "pump",
            report(serde_json::json!({"state": {"reported": {"c8y_RequiredAvailability": {"responseInterval": 5}}}})),
        )
        .await
        .expect("report");
    let state = |registry: Registry| async move {
        match registry
            .request("pump", Request::GetState)
            .await
            .expect("state")
        {
            Response::State(state) => *state,
            other => panic!("unexpected {other:?}"),
        }
    };
    let alarm_status = |state: &ThingState| {
        state
            .alarms
            .alarms
            .get("c8y_UnavailabilityAlarm")
            .map(|a| a.status)
    };
    clock.advance_ms(5 * 60_000 - 1);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(alarm_status(&state(registry.clone()).await), None);
    clock.advance_ms(1);
    let deadline = Instant::now() + Duration::from_secs(10);
    while alarm_status(&state(registry.clone()).await) != Some(AlarmStatus::Active) {
        assert!(Instant::now() < deadline, "the alarm was not raised");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    registry
        .request(
            "pump",
            report(serde_json::json!({"state": {"reported": {"t": 1}}})),
        )
        .await
        .expect("data");
    assert_eq!(
        alarm_status(&state(registry.clone()).await),
        Some(AlarmStatus::Cleared)
    );
}
