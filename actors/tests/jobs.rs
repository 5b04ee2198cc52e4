//! Job executions in real Thing actors over real storage, on a manual clock: a device runs its
//! jobs and the notifications follow the pending list; the executions survive a restart; a
//! step timer fires on a passivated Thing after a restart; the job's counts converge on the
//! executions after any operations and crashes.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use proptest::prelude::*;
use serde_json::{json, Map, Value};
use thinghub_actors::clock::{Clock, ManualClock};
use thinghub_actors::codec;
use thinghub_actors::context::DeadlineWake;
use thinghub_actors::deadlines::DeadlineConfig;
use thinghub_actors::groups::Groups;
use thinghub_actors::job_manager::{CreateJob, JobManager, JobManagerConfig, JobStatus, CONSUMER};
use thinghub_actors::outbox::{EffectSink, Outbox};
use thinghub_actors::thing::effects::Effect;
use thinghub_actors::thing::jobs::{
    JobEvent, JobExecutionStatus, JobExecutions, JobUpdate, QueueJob, StartNext,
};
use thinghub_actors::thing::{Limits, RegisterThing, ThingEvent};
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
        counters: Default::default(),
        alarm_rules: Default::default(),
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

async fn register(things: &Things, name: &str) {
    let thing = RegisterThing::default();
    things.register(name, thing).await.expect("register");
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
    register(&things, "t1").await;

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
    register(&things, "t1").await;
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

// ---- the job's counts follow the executions, whatever happens in between ----

const THINGS: [&str; 4] = ["t0", "t1", "t2", "t3"];

/// A node, the Things over it and a job manager, as a server wires them.
struct Fleet {
    node: Node,
    things: Things,
    manager: JobManager,
}

async fn fleet(store: &Store, clock: Arc<ManualClock>) -> Fleet {
    let node = start(store, clock.clone(), Arc::new(Notifications::default())).await;
    let things = Things::new(node.registry().clone());
    let manager = JobManager::new(
        store.clone(),
        things.clone(),
        Groups::new(store.clone()),
        clock,
        JobManagerConfig::default(),
    );
    let recovered = manager.recover().expect("recover");
    manager.resume(recovered);
    Fleet {
        node,
        things,
        manager,
    }
}

fn create_job(things: &[&str]) -> CreateJob {
    CreateJob {
        job_id: "j".into(),
        description: None,
        document: Map::new(),
        things: things.iter().map(|t| t.to_string()).collect(),
        in_progress_timeout_minutes: None,
        maximum_per_minute: None,
        exponential_rate: None,
        abort_criteria: Vec::new(),
        groups: Vec::new(),
        continuous: false,
    }
}

/// Registers every Thing and creates job `j` to all of them; returns once every execution is
/// queued.
async fn queue_everywhere(fleet: &Fleet) {
    for thing in THINGS {
        register(&fleet.things, thing).await;
    }
    fleet
        .manager
        .create(create_job(&THINGS))
        .await
        .expect("create");
    wait_for_executions(&fleet.things, "every execution queued", |jobs| {
        jobs.get("j").is_some()
    })
    .await;
}

/// Waits (bounded) until `done` holds for the executions of job `j` on every Thing.
async fn wait_for_executions(things: &Things, what: &str, done: impl Fn(&JobExecutions) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut all = true;
        for thing in THINGS {
            all &= done(&things.jobs(thing).await.expect("jobs"));
        }
        if all {
            return;
        }
        assert!(Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The outcome of job `j` on `thing`, from its log: the first terminal status its execution
/// reached, else its status now.
fn outcome(store: &Store, thing: &str) -> JobExecutionStatus {
    let mut status = None;
    for recorded in store.read_events(thing, 1, usize::MAX).expect("events") {
        let Ok(ThingEvent::Job(event)) = codec::decode_event(thing, &recorded) else {
            continue;
        };
        let after = match &event {
            JobEvent::Queued(_) => JobExecutionStatus::Queued,
            JobEvent::Updated(updated) => updated.status,
            JobEvent::TimedOut(_) => JobExecutionStatus::TimedOut,
            JobEvent::Canceled(_) => JobExecutionStatus::Canceled,
            JobEvent::Removed(_) => JobExecutionStatus::Removed,
        };
        if !status.is_some_and(JobExecutionStatus::is_terminal) {
            status = Some(after);
        }
    }
    status.expect("an execution was queued")
}

/// What the counts should be (each target's outcome), and the job's counts and targets as
/// stored.
async fn expected_and_counted(
    store: &Store,
    fleet: &Fleet,
) -> (BTreeMap<String, u64>, BTreeMap<String, u64>, Vec<String>) {
    let mut expected = BTreeMap::new();
    for thing in THINGS {
        let status = outcome(store, thing);
        *expected.entry(status.as_str().to_owned()).or_insert(0) += 1;
    }
    let counted: BTreeMap<String, u64> = fleet
        .manager
        .get("j")
        .expect("job")
        .counts
        .into_iter()
        .filter(|(_, n)| *n > 0)
        .collect();
    let stored: Vec<String> = fleet
        .manager
        .targets("j", None, None, 100)
        .expect("targets")
        .into_iter()
        .map(|t| format!("{}={}", t.thing, t.status.map_or("none", |s| s.as_str())))
        .collect();
    assert!(
        stored.len() == THINGS.len(),
        "every target is stored: {stored:?}"
    );
    (expected, counted, stored)
}

#[derive(Debug, Clone)]
enum Op {
    Start(usize),
    Update(usize, &'static str),
    Cancel(bool),
    Remove(usize, bool),
    TimeOut,
    Count,
    /// A crash: the counter's cursor falls back to one it saved before (it is not synced),
    /// and the Things and the job side start again from storage.
    Crash(usize),
}

fn op() -> impl Strategy<Value = Op> {
    let thing = 0..THINGS.len();
    let status = prop::sample::select(vec!["IN_PROGRESS", "SUCCEEDED", "FAILED", "REJECTED"]);
    prop_oneof![
        3 => thing.clone().prop_map(Op::Start),
        3 => (thing.clone(), status).prop_map(|(t, s)| Op::Update(t, s)),
        1 => any::<bool>().prop_map(Op::Cancel),
        1 => (thing, any::<bool>()).prop_map(|(t, f)| Op::Remove(t, f)),
        1 => Just(Op::TimeOut),
        2 => Just(Op::Count),
        1 => (0usize..8).prop_map(Op::Crash),
    ]
}

async fn run_ops(ops: Vec<Op>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(&StoreConfig::new(dir.path())).expect("open");
    let clock = ManualClock::new(T0);
    let mut fleet = fleet(&store, clock.clone()).await;
    queue_everywhere(&fleet).await;
    let mut cursors = vec![store.cursor(CONSUMER).expect("cursor")];
    for op in ops {
        match op {
            Op::Start(t) => {
                let request = StartNext {
                    status_details: None,
                    step_timeout_minutes: Some(1),
                };
                let _ = fleet.things.start_next_job(THINGS[t], request).await;
            }
            Op::Update(t, status) => {
                let update = JobUpdate {
                    job_id: "j".into(),
                    status: status.into(),
                    status_details: None,
                    expected_version: None,
                    execution_number: None,
                    step_timeout_minutes: None,
                };
                let _ = fleet.things.update_job(THINGS[t], update).await;
            }
            Op::Cancel(force) => {
                let _ = fleet.manager.cancel("j", force, None).await;
            }
            Op::Remove(t, force) => {
                let _ = fleet.things.remove_job(THINGS[t], "j", force).await;
            }
            Op::TimeOut => {
                clock.advance_ms(61_000);
                let now = clock.now_ms();
                wait_for_executions(&fleet.things, "the step timers fired", |jobs| {
                    jobs.next_deadline_ms().is_none_or(|d| d > now)
                })
                .await;
            }
            Op::Count => {
                fleet.manager.count_round().await.expect("count");
                cursors.push(store.cursor(CONSUMER).expect("cursor"));
            }
            Op::Crash(k) => {
                let cursor = cursors[k % cursors.len()];
                fleet
                    .node
                    .shutdown(Duration::from_secs(5))
                    .await
                    .expect("shutdown");
                store.set_cursor(CONSUMER, cursor).expect("cursor");
                fleet = self::fleet(&store, clock.clone()).await;
            }
        }
    }
    // Then the counts converge on the executions' statuses (a cancellation's propagation
    // runs in the background; it ends).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        while fleet.manager.count_round().await.expect("count") > 0 {}
        let (expected, counted, stored) = expected_and_counted(&store, &fleet).await;
        let job = fleet.manager.get("j").expect("job");
        let has = |status: JobExecutionStatus| counted.contains_key(status.as_str());
        // A cancellation ends the queued executions (and those in progress with force).
        let settled = match job.status {
            JobStatus::Canceled => {
                let ended_by_cancel = if job.force_canceled {
                    !has(JobExecutionStatus::InProgress)
                } else {
                    true
                };
                !has(JobExecutionStatus::Queued) && ended_by_cancel
            }
            _ => true,
        };
        if expected == counted && settled {
            let all_ended = counted
                .keys()
                .all(|s| JobExecutionStatus::parse(s).is_some_and(|s| s.is_terminal()));
            match job.status {
                JobStatus::InProgress => assert!(!all_ended, "every execution ended: {job:?}"),
                JobStatus::Completed => assert!(all_ended, "completed too soon: {job:?}"),
                JobStatus::Canceled => {}
            }
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the counts never converged: counted {counted:?}, executions {expected:?}, targets {stored:?}, job {job:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    fleet
        .node
        .shutdown(Duration::from_secs(5))
        .await
        .expect("shutdown");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// After any sequence of starts, updates, cancels, removals, time-outs, counting rounds and
    /// crashes, the job's counts equal its executions' statuses, and the job has ended exactly
    /// when every execution has.
    #[test]
    fn the_job_counts_converge_on_the_executions(ops in prop::collection::vec(op(), 1..25)) {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(run_ops(ops));
    }
}

/// A server whose feed was empty at its first start stored the counter's cursor as 0; a
/// restart must count from there, not jump to the end as a first start does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cursor_stored_as_zero_is_not_a_first_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(&StoreConfig::new(dir.path())).expect("open");
    let clock = ManualClock::new(T0);
    let fleet = fleet(&store, clock.clone()).await;
    assert_eq!(store.cursor_stored(CONSUMER).expect("cursor"), Some(0));
    queue_everywhere(&fleet).await;
    // No counting round ran before the "crash": the cursor is still 0.
    fleet
        .node
        .shutdown(Duration::from_secs(5))
        .await
        .expect("shutdown");
    let fleet = self::fleet(&store, clock).await;
    while fleet.manager.count_round().await.expect("count") > 0 {}
    let (expected, counted, _) = expected_and_counted(&store, &fleet).await;
    assert_eq!(counted, expected);
    assert_eq!(counted.get("QUEUED"), Some(&4));
    fleet
        .node
        .shutdown(Duration::from_secs(5))
        .await
        .expect("shutdown");
}
