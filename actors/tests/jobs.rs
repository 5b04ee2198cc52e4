//! Job executions in real Thing actors over real storage, on a manual clock: a device runs its
//! jobs and the notifications follow the pending list; the executions survive a restart; a
//! step timer fires on a passivated Thing after a restart.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};
use thinghub_actors::clock::ManualClock;
use thinghub_actors::context::DeadlineWake;
use thinghub_actors::deadlines::DeadlineConfig;
use thinghub_actors::outbox::{EffectSink, Outbox};
use thinghub_actors::thing::effects::Effect;
use thinghub_actors::thing::jobs::{
    JobExecutionStatus, JobExecutions, JobUpdate, QueueJob, StartNext,
};
use thinghub_actors::thing::{Limits, RegisterThing};
use thinghub_actors::{Node, NodeConfig, ThingContext, Things};
use thinghub_storage::{Store, StoreConfig};

const T0: u64 = 1_700_000_000_000;

/// Records the job notifications it is given.
#[derive(Default)]
struct Notifications {
    seen: Mutex<Vec<(String, Value)>>,
}

impl Notifications {
    fn take(&self) -> Vec<(String, Value)> {
        std::mem::take(&mut *self.seen.lock().expect("lock"))
    }
}

impl EffectSink for Notifications {
    fn wants_documents(&self, _thing: &str) -> bool {
        false
    }

    fn deliver(&self, _thing: &str, effects: &[Effect]) {
        let mut seen = self.seen.lock().expect("lock");
        for effect in effects {
            match effect {
                Effect::JobsNotify(body) => seen.push(("notify".into(), body.clone())),
                Effect::JobsNotifyNext(body) => seen.push(("notify-next".into(), body.clone())),
                _ => {}
            }
        }
    }

    fn checkpoint(&self) -> Result<bool, String> {
        Ok(false)
    }
}

async fn start(store: &Store, clock: Arc<ManualClock>, sink: Arc<Notifications>) -> Node {
    let context = Arc::new(ThingContext {
        store: store.clone(),
        clock,
        limits: Limits::default(),
        snapshot_every_events: 3,
        deadlines: DeadlineWake::new(),
        outbox: Arc::new(Outbox::new(store, sink).expect("outbox")),
    });
    let config = NodeConfig {
        deadlines: DeadlineConfig {
            scan_interval_max_ms: 10,
            retry_after_ms: 10,
            ..DeadlineConfig::default()
        },
        ..NodeConfig::default()
    };
    Node::start(context, config).await.expect("node")
}

fn queue(job_id: &str) -> QueueJob {
    QueueJob {
        job_id: job_id.into(),
        execution_number: 1,
        document: json!({"firmware": job_id})
            .as_object()
            .cloned()
            .unwrap_or_else(Map::new)
            .into(),
        in_progress_timeout_s: None,
    }
}

async fn jobs(things: &Things) -> JobExecutions {
    things.jobs("t1").await.expect("jobs")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_runs_its_jobs_and_the_notifications_follow_the_pending_list() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(&StoreConfig::new(dir.path())).expect("open");
    let clock = ManualClock::new(T0);
    let sink = Arc::new(Notifications::default());
    let node = start(&store, clock.clone(), sink.clone()).await;
    let things = Things::new(node.registry().clone());
    things
        .register(
            "t1",
            RegisterThing {
                mqtt_client_id: None,
                thing_type: None,
                attributes: Default::default(),
            },
        )
        .await
        .expect("register");

    // Given two queued jobs: the first is announced and becomes the next; the second only
    // lengthens the list.
    things.queue_job("t1", queue("j1")).await.expect("queue");
    let seen = sink.take();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert_eq!(seen[0].1["jobs"]["QUEUED"][0]["jobId"], "j1");
    assert_eq!(seen[1].0, "notify-next");
    assert_eq!(seen[1].1["execution"]["jobId"], "j1");
    assert_eq!(
        seen[1].1["execution"]["jobDocument"],
        json!({"firmware": "j1"})
    );
    clock.advance_ms(1_000);
    things.queue_job("t1", queue("j2")).await.expect("queue");
    let seen = sink.take();
    assert_eq!(seen.len(), 1, "the head did not change: {seen:?}");
    assert_eq!(
        seen[0].1["jobs"]["QUEUED"].as_array().map(Vec::len),
        Some(2)
    );

    // When the device starts the next one: the list changes (it is in progress), the head not.
    let started = things
        .start_next_job("t1", StartNext::default())
        .await
        .expect("start-next")
        .expect("an execution");
    assert_eq!(started.job_id, "j1");
    assert_eq!(started.status, JobExecutionStatus::InProgress);
    let seen = sink.take();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].1["jobs"]["IN_PROGRESS"][0]["jobId"], "j1");

    // A stale version is refused with the current state; the right one finishes it.
    let mut update = JobUpdate {
        job_id: "j1".into(),
        status: "SUCCEEDED".into(),
        status_details: None,
        expected_version: Some(1),
        execution_number: None,
        step_timeout_minutes: None,
    };
    let refused = things
        .update_job("t1", update.clone())
        .await
        .expect_err("stale version");
    assert_eq!(refused.execution_state.expect("state")["versionNumber"], 2);
    update.expected_version = Some(2);
    let done = things.update_job("t1", update).await.expect("update");
    assert_eq!(done.status, JobExecutionStatus::Succeeded);
    let seen = sink.take();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert_eq!(seen[1].1["execution"]["jobId"], "j2", "j2 is next now");

    // Then a restart replays the same executions.
    let before = jobs(&things).await;
    node.shutdown(Duration::from_secs(5))
        .await
        .expect("shutdown");
    let node = start(&store, clock.clone(), sink.clone()).await;
    let things = Things::new(node.registry().clone());
    assert_eq!(jobs(&things).await, before);
    node.shutdown(Duration::from_secs(5))
        .await
        .expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_timer_fires_on_a_passivated_thing_after_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(&StoreConfig::new(dir.path())).expect("open");
    let clock = ManualClock::new(T0);
    let sink = Arc::new(Notifications::default());
    let node = start(&store, clock.clone(), sink.clone()).await;
    let things = Things::new(node.registry().clone());
    things
        .register(
            "t1",
            RegisterThing {
                mqtt_client_id: None,
                thing_type: None,
                attributes: Default::default(),
            },
        )
        .await
        .expect("register");
    things.queue_job("t1", queue("j1")).await.expect("queue");
    let request = StartNext {
        status_details: None,
        step_timeout_minutes: Some(1),
    };
    things
        .start_next_job("t1", request)
        .await
        .expect("start-next")
        .expect("an execution");
    node.shutdown(Duration::from_secs(5))
        .await
        .expect("shutdown");

    // Restarted, nobody asks for t1: only the deadline index can wake it.
    let node = start(&store, clock.clone(), sink.clone()).await;
    let things = Things::new(node.registry().clone());
    sink.take();
    clock.advance_ms(60_000);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let seen = sink.take();
        if let Some((_, next)) = seen.iter().find(|(kind, _)| kind == "notify-next") {
            assert!(next.get("execution").is_none(), "nothing pending: {next}");
            break;
        }
        assert!(Instant::now() < deadline, "the step timer never fired");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let jobs = jobs(&things).await;
    assert_eq!(
        jobs.get("j1").map(|e| e.status),
        Some(JobExecutionStatus::TimedOut)
    );
    node.shutdown(Duration::from_secs(5))
        .await
        .expect("shutdown");
}
