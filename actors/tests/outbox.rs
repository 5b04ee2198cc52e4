//! The outbox against real storage and real Thing actors: effects are handed to the sink as
//! changes commit; effects lost with a process (a sink that never got them) are delivered
//! again from the change feed at the next start, and only those the Thing still owes.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;
use thinghub_actors::clock::SystemClock;
use thinghub_actors::node;
use thinghub_actors::outbox::{self, EffectSink, Outbox, OutboxConfig};
use thinghub_actors::thing::effects::Effect;
use thinghub_actors::thing::{
    CommandResponse, Limits, Origin, RegisterThing, SendCommand, ShadowUpdate,
};
use thinghub_actors::{Registry, RegistryConfig, ThingContext, Things};
use thinghub_storage::{Store, StoreConfig};

/// Records what it is given.
#[derive(Default)]
struct Recorder {
    delivered: Mutex<Vec<(String, Effect)>>,
}

impl Recorder {
    fn names(&self) -> Vec<String> {
        self.delivered
            .lock()
            .expect("lock")
            .iter()
            .map(|(thing, e)| format!("{thing}:{}", e.name()))
            .collect()
    }

    fn take(&self) -> Vec<(String, Effect)> {
        std::mem::take(&mut *self.delivered.lock().expect("lock"))
    }
}

impl EffectSink for Recorder {
    fn wants_documents(&self, _thing: &str) -> bool {
        false
    }

    fn deliver(&self, thing: &str, effects: &[Effect]) {
        let mut delivered = self.delivered.lock().expect("lock");
        delivered.extend(effects.iter().map(|e| (thing.to_owned(), e.clone())));
    }

    fn checkpoint(&self) -> Result<bool, String> {
        Ok(false)
    }
}

async fn start(store: &Store, sink: Arc<dyn EffectSink>) -> (Things, Arc<Outbox>) {
    let outbox = Arc::new(Outbox::new(store, sink).expect("outbox"));
    let context = Arc::new(ThingContext {
        store: store.clone(),
        clock: Arc::new(SystemClock),
        limits: Limits::default(),
        deadlines: thinghub_actors::context::DeadlineWake::new(),
        outbox: outbox.clone(),
        counters: Default::default(),
        alarm_rules: Default::default(),
        snapshot_every_events: 3,
    });
    let registry = Registry::start(context, RegistryConfig::default())
        .await
        .expect("registry");
    (Things::new(registry), outbox)
}

async fn register(things: &Things, name: &str) {
    let thing = RegisterThing::default();
    things.register(name, thing).await.expect("register");
}

fn command(action: &str) -> SendCommand {
    SendCommand::from_json(
        &json!({"action": action, "ttl": 600}),
        Things::new_execution_id(),
        Things::new_execution_id,
        &Default::default(),
    )
    .expect("valid")
}

fn desired(speed: i64) -> ShadowUpdate {
    ShadowUpdate::from_json(
        &json!({"state":{"desired":{"speed": speed}}}),
        &Default::default(),
    )
    .expect("valid")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn effects_lost_with_a_process_are_delivered_again_and_only_what_is_still_owed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(&StoreConfig::new(dir.path())).expect("open");

    // A first run whose sink loses everything and whose cursor never moves (as if the process
    // died after each commit).
    let lost = Arc::new(Recorder::default());
    let (things, _) = start(&store, lost.clone()).await;
    register(&things, "lamp").await;
    let answered = things
        .send_command("lamp", command("answered"))
        .await
        .expect("send");
    let pending = things
        .send_command("lamp", command("pending"))
        .await
        .expect("send");
    things
        .respond_command(
            "lamp",
            CommandResponse::from_json(
                &answered.execution_id,
                &json!({"status":"SUCCEEDED"}),
                &Default::default(),
            )
            .expect("valid"),
        )
        .await
        .expect("answer");
    things
        .update_shadow("lamp", desired(5), Origin::Operator)
        .await
        .expect("desired");
    assert_eq!(
        lost.names(),
        [
            "lamp:thing-registered",
            "lamp:command-requested",
            "lamp:command-requested",
            "lamp:command-answered",
            "lamp:shadow-accepted",
            "lamp:desired-pushed",
            "lamp:delta",
        ],
        "the live path hands every effect over as the change commits"
    );
    things.registry().shutdown(Duration::from_secs(5)).await;

    // The next start: what the Thing still owes is delivered again before anything else.
    let again = Arc::new(Recorder::default());
    let (things, outbox) = start(&store, again.clone()).await;
    let saved = node::recover_at_start(things.registry(), &outbox, &OutboxConfig::default()).await;
    let redelivered = again.take();
    let names: Vec<&str> = redelivered.iter().map(|(_, e)| e.name()).collect();
    assert_eq!(
        names,
        [
            "thing-registered",
            "command-requested",
            "command-answered",
            "shadow-accepted",
            "desired-pushed",
            "delta",
        ],
        "each event's effects again, but no request for the command already answered"
    );
    assert!(matches!(
        &redelivered[1].1,
        Effect::CommandRequested(e) if e.execution_id == pending.execution_id
    ));
    assert!(matches!(&redelivered[5].1, Effect::Delta(d) if d["state"] == json!({"speed":5})));
    assert!(saved > 0, "the cursor moved past what was recovered");
    assert_eq!(store.cursor(outbox::CONSUMER).expect("cursor"), saved);
    things.registry().shutdown(Duration::from_secs(5)).await;

    // Once the cursor is past them, they are not delivered again.
    let third = Arc::new(Recorder::default());
    let (things, outbox) = start(&store, third.clone()).await;
    node::recover_at_start(things.registry(), &outbox, &OutboxConfig::default()).await;
    assert_eq!(third.names(), Vec::<String>::new());
}

#[tokio::test]
async fn a_thing_that_cannot_deliver_again_is_retried_then_given_up_without_holding_others() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(&StoreConfig::new(dir.path())).expect("open");
    let (things, _) = start(&store, Arc::new(Recorder::default())).await;
    for name in ["broken", "fine"] {
        register(&things, name).await;
        things
            .update_shadow(name, desired(5), Origin::Operator)
            .await
            .expect("desired");
    }
    things.registry().shutdown(Duration::from_secs(5)).await;
    // Its shadow update (seq 2) can no longer be read.
    store
        .inject_raw_event("broken", 2, b"\xc1 not msgpack")
        .await
        .expect("damage");

    let again = Arc::new(Recorder::default());
    let (things, outbox) = start(&store, again.clone()).await;
    let config = OutboxConfig {
        recover_attempts_max: 3,
        checkpoint_interval: Duration::from_millis(1),
        ..OutboxConfig::default()
    };
    // Rounds ask in the background; poll (bounded) until the broken Thing is given up.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut saved = 0;
    loop {
        saved = node::round(things.registry(), &outbox, &config, saved).await;
        // Read in this order: a Thing is counted as abandoned before its positions are marked.
        let through = outbox.handled_through();
        let abandoned = outbox.stats.abandoned.load(Ordering::Relaxed);
        if through > 0 {
            assert_eq!(
                abandoned, 2,
                "the failing Thing's first position stays owed until it is given up"
            );
            break;
        }
        assert!(std::time::Instant::now() < deadline, "never given up");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert!(
        again.names().contains(&"fine:desired-pushed".to_owned()),
        "the other Thing's effects went out meanwhile: {:?}",
        again.names()
    );
    assert_eq!(outbox.handled_through(), 4, "the cursor moves for everyone");
    saved = node::round(things.registry(), &outbox, &config, saved).await;
    assert_eq!(saved, 4);
    assert_eq!(store.cursor(outbox::CONSUMER).expect("cursor"), 4);
    things.registry().shutdown(Duration::from_secs(5)).await;
}
