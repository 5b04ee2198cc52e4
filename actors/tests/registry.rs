//! The actor shell against real storage: durability, replay, snapshots, passivation races,
//! supervision and corrupt records.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use thinghub_actors::clock::SystemClock;
use thinghub_actors::thing::{
    ErrorCode, Limits, Origin, RegisterThing, Reply, ShadowLimits, ShadowUpdate, ThingCommand,
};
use thinghub_actors::thing_actor::ThingMsg;
use thinghub_actors::{
    load_state, Node, NodeConfig, Registry, RegistryConfig, Request, Response, ThingContext,
};
use thinghub_storage::{Store, StoreConfig};

async fn start(store: &Store, config: RegistryConfig, snapshot_every_events: u64) -> Node {
    let context = Arc::new(ThingContext {
        store: store.clone(),
        clock: Arc::new(SystemClock),
        limits: Limits::default(),
        deadlines: thinghub_actors::context::DeadlineWake::new(),
        outbox: thinghub_actors::outbox::Outbox::without_frontend(store).expect("outbox"),
        counters: Default::default(),
        alarm_rules: Default::default(),
        snapshot_every_events,
    });
    Node::start(
        context,
        NodeConfig {
            registry: config,
            ..NodeConfig::default()
        },
    )
    .await
    .expect("node")
}

fn register() -> Request {
    Request::Command(ThingCommand::Register(RegisterThing {
        mqtt_client_id: None,
        thing_type: None,
        attributes: Default::default(),
    }))
}

fn report(value: i64) -> Request {
    let update = ShadowUpdate::from_json(
        &json!({"state":{"reported":{"n": value}}}),
        &ShadowLimits::default(),
    )
    .expect("valid");
    Request::Command(ThingCommand::UpdateShadow {
        update,
        origin: Origin::Device,
        want_documents: false,
    })
}

fn version_of(response: Response) -> u64 {
    match response {
        Response::Decided(Reply::ShadowUpdated(result)) => result.version,
        other => panic!("expected an accepted update, got {other:?}"),
    }
}

async fn shadow_version(registry: &Registry, name: &str) -> u64 {
    match registry
        .request(name, Request::GetShadow)
        .await
        .expect("shadow")
    {
        Response::Shadow(doc) => doc.version,
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_and_versions_survive_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let store = Store::open(&StoreConfig::new(dir.path())).expect("open");
        let node = start(&store, RegistryConfig::default(), 500).await;
        let registry = node.registry().clone();
        registry.request("t1", register()).await.expect("register");
        for n in 1..=5 {
            assert_eq!(
                version_of(registry.request("t1", report(n)).await.expect("update")),
                n as u64
            );
        }
        node.shutdown(Duration::from_secs(5))
            .await
            .expect("shutdown");
    }
    let store = Store::reopen_in_process(&StoreConfig::new(dir.path())).expect("reopen");
    let node = start(&store, RegistryConfig::default(), 500).await;
    let registry = node.registry().clone();
    assert_eq!(shadow_version(&registry, "t1").await, 5);
    assert_eq!(
        version_of(registry.request("t1", report(6)).await.expect("update")),
        6
    );
    let err = registry
        .request("t1", register())
        .await
        .expect_err("exists");
    assert_eq!(err.code(), ErrorCode::Conflict);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_are_taken_every_n_events_and_equal_a_full_replay() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(&StoreConfig::new(dir.path())).expect("open");
    let node = start(&store, RegistryConfig::default(), 3).await;
    let registry = node.registry().clone();
    registry.request("s", register()).await.expect("register");
    for n in 1..=9 {
        registry.request("s", report(n)).await.expect("update");
    }
    // 10 events: snapshots after events 3, 6 and 9.
    let snapshot = store
        .get_snapshot("s")
        .expect("read")
        .expect("snapshot written");
    assert_eq!(snapshot.seq, 9);
    let live = match registry
        .request("s", Request::GetState)
        .await
        .expect("state")
    {
        Response::State(state) => *state,
        other => panic!("unexpected {other:?}"),
    };
    assert_eq!(load_state(&store, "s").expect("snapshot + tail"), live);
    store.delete_snapshot("s").expect("drop snapshot");
    assert_eq!(load_state(&store, "s").expect("log alone"), live);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_racing_passivation_are_never_lost() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(&StoreConfig::new(dir.path())).expect("open");
    let config = RegistryConfig {
        shards: 4,
        thing_idle_ms: 1,
        request_timeout_ms: 30_000,
        requests_in_flight_max: 10,
    };
    let node = start(&store, config, 7).await;
    let registry = node.registry().clone();
    let things = 8;
    let writers_per_thing = 4;
    let updates_per_writer = 60;
    for t in 0..things {
        registry
            .request(&format!("r{t}"), register())
            .await
            .expect("register");
    }
    let mut tasks = Vec::new();
    for t in 0..things {
        for _ in 0..writers_per_thing {
            let registry = registry.clone();
            tasks.push(tokio::spawn(async move {
                for n in 0..updates_per_writer {
                    registry
                        .request(&format!("r{t}"), report(n))
                        .await
                        .expect("every request is answered and accepted");
                    if n % 7 == 0 {
                        // Let the sweeper catch the Thing idle between bursts.
                        tokio::task::yield_now().await;
                    }
                }
            }));
        }
    }
    for task in tasks {
        task.await.expect("writer");
    }
    let expected = (writers_per_thing * updates_per_writer) as u64;
    for t in 0..things {
        assert_eq!(shadow_version(&registry, &format!("r{t}")).await, expected);
    }
    let stats = registry.stats();
    assert!(stats.passivations > 0, "the race was exercised: {stats:?}");
    assert_eq!(stats.failures, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_thing_restarts_from_storage_and_others_are_unaffected() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(&StoreConfig::new(dir.path())).expect("open");
    let node = start(&store, RegistryConfig::default(), 500).await;
    let registry = node.registry().clone();
    for name in ["victim", "bystander"] {
        registry.request(name, register()).await.expect("register");
        registry.request(name, report(1)).await.expect("update");
    }

    // A panic inside the domain guard: this request gets a 500, the actor reloads and goes on.
    let (reply, answer) = tokio::sync::oneshot::channel();
    registry.route_raw(
        "victim",
        ThingMsg::InjectPanic {
            guarded: true,
            reply,
        },
    );
    let err = answer.await.expect("answered").expect_err("internal error");
    assert_eq!(err.code(), ErrorCode::Internal);
    assert_eq!(shadow_version(&registry, "victim").await, 1);

    // A panic outside it kills the actor: the supervisor clears it; the next request restarts it.
    let (reply, answer) = tokio::sync::oneshot::channel();
    registry.route_raw(
        "victim",
        ThingMsg::InjectPanic {
            guarded: false,
            reply,
        },
    );
    assert!(
        answer.await.is_err(),
        "the failed request's reply channel is dropped"
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while registry.stats().failures == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "supervisor never saw the failure"
        );
        tokio::task::yield_now().await;
    }
    assert_eq!(
        version_of(
            registry
                .request("victim", report(2))
                .await
                .expect("restarted")
        ),
        2
    );
    assert_eq!(
        version_of(
            registry
                .request("bystander", report(2))
                .await
                .expect("unaffected")
        ),
        2
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_record_is_named_and_isolated_to_its_thing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(&StoreConfig::new(dir.path())).expect("open");
    {
        let node = start(&store, RegistryConfig::default(), 500).await;
        let registry = node.registry().clone();
        for name in ["bad", "good"] {
            registry.request(name, register()).await.expect("register");
        }
        node.shutdown(Duration::from_secs(5))
            .await
            .expect("shutdown");
    }
    store
        .inject_raw_event("bad", 2, &[0xc1, 0x00, 0xff])
        .await
        .expect("inject");
    let node = start(&store, RegistryConfig::default(), 500).await;
    let registry = node.registry().clone();
    let err = registry
        .request("bad", Request::Describe)
        .await
        .expect_err("unavailable");
    assert_eq!(err.code(), ErrorCode::Unavailable);
    assert!(
        err.message.contains("'bad'") && err.message.contains("seq 2"),
        "{}",
        err.message
    );
    registry
        .request("good", Request::Describe)
        .await
        .expect("good still served");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn activation_repairs_a_registry_index_that_lags_the_log() {
    use thinghub_storage::IndexOp;
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(&StoreConfig::new(dir.path())).expect("open");
    let node = start(&store, RegistryConfig::default(), 500).await;
    let registry = node.registry().clone();
    registry
        .request("lagging", register())
        .await
        .expect("register");
    registry
        .request("ghost", register())
        .await
        .expect("register");
    registry
        .request("ghost", Request::Command(ThingCommand::Delete))
        .await
        .expect("delete");
    node.shutdown(Duration::from_secs(5))
        .await
        .expect("shutdown");

    // As if a crash fell between each event and its index write.
    store
        .repair_index("lagging", &[IndexOp::RemoveThing])
        .expect("remove");
    store
        .repair_index("ghost", &[IndexOp::PutThing(b"stale".to_vec())])
        .expect("put");

    let node = start(&store, RegistryConfig::default(), 500).await;

    let registry = node.registry().clone();
    registry
        .request("lagging", Request::Describe)
        .await
        .expect("registered per the log");
    let err = registry
        .request("ghost", Request::Describe)
        .await
        .expect_err("deleted per the log");
    assert_eq!(err.code(), ErrorCode::NotFound);
    assert!(
        store.get_thing("lagging").expect("read").is_some(),
        "index entry restored"
    );
    assert!(
        store.get_thing("ghost").expect("read").is_none(),
        "stale entry removed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_beyond_the_in_flight_bound_get_429_and_the_rest_all_land() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(&StoreConfig::new(dir.path())).expect("open");
    let config = RegistryConfig {
        requests_in_flight_max: 3,
        ..RegistryConfig::default()
    };
    let node = start(&store, config, 500).await;
    let registry = node.registry().clone();
    registry
        .request("busy", register())
        .await
        .expect("register");
    let mut tasks = Vec::new();
    for n in 0..40 {
        let registry = registry.clone();
        tasks.push(tokio::spawn(async move {
            registry.request("busy", report(n)).await
        }));
    }
    let (mut accepted, mut throttled) = (0u64, 0u64);
    for task in tasks {
        match task.await.expect("join") {
            Ok(_) => accepted += 1,
            Err(e) if e.code() == ErrorCode::TooManyRequests => throttled += 1,
            Err(e) => panic!("unexpected {e:?}"),
        }
    }
    assert_eq!(accepted + throttled, 40);
    assert!(throttled > 0, "40 at once over a bound of 3");
    assert_eq!(
        shadow_version(&registry, "busy").await,
        accepted,
        "every accepted update landed"
    );
    // The places were all given back.
    for n in 0..5 {
        registry
            .request("busy", report(100 + n))
            .await
            .expect("sequential requests pass");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_ids_are_claimed_once_backfilled_once_and_freed_by_deletion() {
    use thinghub_actors::codec::{encode_index_record, ThingIndexRecord};
    use thinghub_actors::service::{backfill_client_ids, claim_client_id, client_id_owner};
    use thinghub_storage::IndexOp;
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(&StoreConfig::new(dir.path())).expect("open");
    // A database from before the index: two Things registered with one client id.
    for name in ["a-first", "b-second"] {
        let record = encode_index_record(&ThingIndexRecord {
            mqtt_client_id: "shared".into(),
            thing_type: None,
            created_at_ms: 1,
        })
        .expect("record");
        store
            .repair_index(name, &[IndexOp::PutThing(record)])
            .expect("index");
    }
    assert_eq!(backfill_client_ids(&store).await.expect("backfill"), 1);
    assert_eq!(
        client_id_owner(&store, "shared").expect("read").as_deref(),
        Some("a-first"),
        "the first in name order keeps it"
    );
    assert_eq!(
        backfill_client_ids(&store).await.expect("again"),
        0,
        "done once"
    );
    assert_eq!(
        claim_client_id(&store, "shared", "c-third").expect("claim"),
        Err("a-first".to_owned())
    );

    // Live registrations: a second Thing asking for a taken id is refused; deletion frees it.
    let node = start(&store, RegistryConfig::default(), 500).await;
    let registry = node.registry().clone();
    let things = thinghub_actors::Things::new(registry.clone());
    let with_id = |id: &str| RegisterThing {
        mqtt_client_id: Some(id.into()),
        thing_type: None,
        attributes: Default::default(),
    };
    things
        .register("valve", with_id("v-7"))
        .await
        .expect("registered");
    let refused = things
        .register("copycat", with_id("v-7"))
        .await
        .expect_err("taken");
    assert_eq!(refused.code(), ErrorCode::Conflict);
    assert_eq!(
        client_id_owner(&store, "v-7").expect("read").as_deref(),
        Some("valve"),
        "a refused registration leaves the owner's claim alone"
    );
    // A refused re-registration of the owner itself does not give its own id up either.
    things
        .register("valve", with_id("v-7"))
        .await
        .expect_err("exists");
    assert_eq!(
        client_id_owner(&store, "v-7").expect("read").as_deref(),
        Some("valve")
    );
    // Two registrations racing for one id: exactly one gets it.
    for round in 0..20 {
        let (a, b) = (format!("race-a-{round}"), format!("race-b-{round}"));
        let id = format!("race-{round}");
        let (first, second) = tokio::join!(
            things.register(&a, with_id(&id)),
            things.register(&b, with_id(&id))
        );
        assert!(
            first.is_ok() != second.is_ok(),
            "round {round}: {first:?} / {second:?}"
        );
    }
    things.delete("valve").await.expect("deleted");
    assert_eq!(client_id_owner(&store, "v-7").expect("read"), None);
    things
        .register("copycat", with_id("v-7"))
        .await
        .expect("free once the owner is gone");
    node.shutdown(Duration::from_secs(5))
        .await
        .expect("shutdown");
}
