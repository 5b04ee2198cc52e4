//! Job executions on one Thing: given/when/then for every transition and refusal, and a
//! proptest over any interleaving.

use proptest::prelude::*;
use serde_json::json;

use super::*;

const LIMITS: JobLimits = JobLimits {
    document_bytes_max: 256,
    status_details_bytes_max: 64,
    pending_max: 3,
    finished_kept_max: 2,
};

fn document() -> Map<String, Value> {
    json!({"operation": "update-firmware", "version": "2.1"})
        .as_object()
        .cloned()
        .expect("object")
}

fn queue(job_id: &str, in_progress_timeout_s: Option<u64>) -> QueueJob {
    QueueJob {
        job_id: job_id.into(),
        execution_number: 1,
        document: document().into(),
        in_progress_timeout_s,
    }
}

fn update(job_id: &str, status: &str) -> JobUpdate {
    JobUpdate {
        job_id: job_id.into(),
        status: status.into(),
        status_details: None,
        expected_version: None,
        execution_number: None,
        step_timeout_minutes: None,
    }
}

fn details(pairs: &[(&str, &str)]) -> Option<BTreeMap<String, String>> {
    Some(
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
    )
}

/// Decides on `jobs`, applies the decision's events; returns its outcome.
fn run(jobs: &mut JobExecutions, decide: impl FnOnce(&JobExecutions) -> JobDecision) -> JobOutcome {
    let decision = decide(jobs);
    for event in &decision.events {
        jobs.apply(event);
    }
    decision.outcome
}

fn given_queued(ids: &[&str], at_ms: u64) -> JobExecutions {
    let mut jobs = JobExecutions::default();
    for (i, id) in ids.iter().enumerate() {
        let decision =
            decide_queue(&jobs, &queue(id, None), at_ms + i as u64, &LIMITS).expect("queued");
        run(&mut jobs, |_| decision);
    }
    jobs
}

fn execution(outcome: JobOutcome) -> JobExecution {
    match outcome {
        JobOutcome::Execution(Some(execution)) => *execution,
        other => panic!("expected an execution, got {other:?}"),
    }
}

fn refusal(outcome: JobOutcome) -> JobRefusal {
    match outcome {
        JobOutcome::Refused(refusal) => *refusal,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[test]
fn start_next_takes_the_oldest_queued_with_its_details_and_step_timer() {
    let mut jobs = given_queued(&["a", "b"], 1_000);
    let request = StartNext {
        status_details: details(&[("progress", "starting")]),
        step_timeout_minutes: Some(5),
    };
    let started = execution(run(&mut jobs, |j| {
        decide_start_next(j, &request, 2_000, &LIMITS)
    }));
    assert_eq!(started.job_id, "a");
    assert_eq!(started.status, JobExecutionStatus::InProgress);
    assert_eq!(started.version_number, 2);
    assert_eq!(started.started_at_ms, Some(2_000));
    assert_eq!(started.step_deadline_ms, Some(2_000 + 5 * 60_000));
    assert_eq!(
        started.status_details,
        details(&[("progress", "starting")]).expect("details")
    );
    assert_eq!(*started.document, document());
    assert_eq!(jobs.next_deadline_ms(), Some(2_000 + 5 * 60_000));
}

#[test]
fn start_next_returns_the_execution_in_progress_unchanged_and_nothing_when_none_is_pending() {
    let mut jobs = given_queued(&["a", "b"], 1_000);
    run(&mut jobs, |j| {
        decide_start_next(j, &StartNext::default(), 2_000, &LIMITS)
    });
    let decision = decide_start_next(&jobs, &StartNext::default(), 3_000, &LIMITS);
    assert!(
        decision.events.is_empty(),
        "no change: {:?}",
        decision.events
    );
    let again = execution(decision.outcome);
    assert_eq!((again.job_id.as_str(), again.version_number), ("a", 2));

    let empty = JobExecutions::default();
    let decision = decide_start_next(&empty, &StartNext::default(), 3_000, &LIMITS);
    assert_eq!(decision.outcome, JobOutcome::Execution(None));
    assert!(decision.events.is_empty());
}

#[test]
fn a_terminal_update_finishes_the_execution_and_nothing_changes_it_after() {
    let mut jobs = given_queued(&["a"], 1_000);
    let mut done = update("a", "SUCCEEDED");
    done.status_details = details(&[("progress", "done")]);
    let finished = execution(run(&mut jobs, |j| decide_update(j, &done, 2_000, &LIMITS)));
    assert_eq!(finished.status, JobExecutionStatus::Succeeded);
    assert_eq!(finished.version_number, 2, "QUEUED -> SUCCEEDED directly");
    assert!(jobs.pending.is_empty());
    for status in ["IN_PROGRESS", "FAILED", "SUCCEEDED"] {
        let decision = decide_update(&jobs, &update("a", status), 3_000, &LIMITS);
        assert!(decision.events.is_empty());
        assert_eq!(
            refusal(decision.outcome).rejection.kind,
            RejectionKind::TerminalStateReached
        );
    }
    for (kind, decision) in [
        (
            RejectionKind::TerminalStateReached,
            decide_cancel(&jobs, "a", true, 3_000, &LIMITS),
        ),
        (
            RejectionKind::ExecutionNotFound,
            decide_cancel(&jobs, "zz", true, 3_000, &LIMITS),
        ),
    ] {
        assert_eq!(refusal(decision.outcome).rejection.kind, kind);
    }
}

#[test]
fn a_stale_expected_version_is_refused_with_the_current_state() {
    let mut jobs = given_queued(&["a"], 1_000);
    run(&mut jobs, |j| {
        decide_start_next(j, &StartNext::default(), 2_000, &LIMITS)
    });
    let mut stale = update("a", "IN_PROGRESS");
    stale.expected_version = Some(1);
    let refused = refusal(decide_update(&jobs, &stale, 3_000, &LIMITS).outcome);
    assert_eq!(refused.rejection.kind, RejectionKind::VersionConflict);
    assert_eq!(
        refused.execution_state,
        Some(json!({"status":"IN_PROGRESS","statusDetails":{},"versionNumber":2}))
    );
    stale.expected_version = Some(2);
    let progressed = execution(run(&mut jobs, |j| decide_update(j, &stale, 3_000, &LIMITS)));
    assert_eq!(progressed.version_number, 3);
}

#[test]
fn a_device_may_set_only_its_four_statuses_of_a_job_it_has() {
    let jobs = given_queued(&["a"], 1_000);
    let cases = [
        (update("a", "QUEUED"), RejectionKind::InvalidStateTransition),
        (
            update("a", "TIMED_OUT"),
            RejectionKind::InvalidStateTransition,
        ),
        (
            update("a", "CANCELED"),
            RejectionKind::InvalidStateTransition,
        ),
        (
            update("a", "REMOVED"),
            RejectionKind::InvalidStateTransition,
        ),
        (update("a", "DONE"), RejectionKind::InvalidRequest),
        (
            update("nope", "SUCCEEDED"),
            RejectionKind::ExecutionNotFound,
        ),
        (
            JobUpdate {
                execution_number: Some(2),
                ..update("a", "SUCCEEDED")
            },
            RejectionKind::ExecutionNotFound,
        ),
    ];
    for (request, kind) in cases {
        let decision = decide_update(&jobs, &request, 2_000, &LIMITS);
        assert!(decision.events.is_empty(), "{request:?}");
        assert_eq!(
            refusal(decision.outcome).rejection.kind,
            kind,
            "{request:?}"
        );
    }
}

#[test]
fn the_step_timer_times_out_exactly_at_its_deadline_and_a_new_step_resets_it() {
    let mut jobs = given_queued(&["a"], 0);
    let start = StartNext {
        status_details: None,
        step_timeout_minutes: Some(1),
    };
    run(&mut jobs, |j| decide_start_next(j, &start, 1_000, &LIMITS));
    assert_eq!(
        decide_fire(&jobs, 60_999, &LIMITS).outcome,
        JobOutcome::TimedOut(0)
    );
    // A progress update with a new step timeout, just in time: the timer restarts.
    let mut progress = update("a", "IN_PROGRESS");
    progress.step_timeout_minutes = Some(2);
    run(&mut jobs, |j| decide_update(j, &progress, 60_000, &LIMITS));
    assert_eq!(jobs.next_deadline_ms(), Some(60_000 + 120_000));
    // Without a step timeout the running timer goes on.
    run(&mut jobs, |j| {
        decide_update(j, &update("a", "IN_PROGRESS"), 90_000, &LIMITS)
    });
    assert_eq!(jobs.next_deadline_ms(), Some(180_000));
    let decision = decide_fire(&jobs, 180_000, &LIMITS);
    assert_eq!(decision.outcome, JobOutcome::TimedOut(1));
    run(&mut jobs, |_| decision);
    assert_eq!(
        jobs.get("a").map(|e| e.status),
        Some(JobExecutionStatus::TimedOut)
    );
    assert_eq!(jobs.next_deadline_ms(), None);
}

#[test]
fn an_update_after_the_deadline_records_the_time_out_first_and_is_refused() {
    let mut jobs = given_queued(&["a"], 0);
    let start = StartNext {
        status_details: None,
        step_timeout_minutes: Some(1),
    };
    run(&mut jobs, |j| decide_start_next(j, &start, 0, &LIMITS));
    let decision = decide_update(&jobs, &update("a", "SUCCEEDED"), 60_000, &LIMITS);
    assert!(matches!(decision.events.as_slice(), [JobEvent::TimedOut(t)] if t.job_id == "a"));
    assert_eq!(
        refusal(decision.outcome).rejection.kind,
        RejectionKind::TerminalStateReached
    );
}

#[test]
fn the_jobs_in_progress_timeout_counts_from_the_start_and_no_step_resets_it() {
    let mut jobs = JobExecutions::default();
    run(&mut jobs, |j| {
        decide_queue(j, &queue("a", Some(600)), 0, &LIMITS).expect("queued")
    });
    assert_eq!(jobs.next_deadline_ms(), None, "no timer while queued");
    run(&mut jobs, |j| {
        decide_start_next(j, &StartNext::default(), 10_000, &LIMITS)
    });
    let mut step = update("a", "IN_PROGRESS");
    step.step_timeout_minutes = Some(60);
    run(&mut jobs, |j| decide_update(j, &step, 20_000, &LIMITS));
    assert_eq!(
        jobs.next_deadline_ms(),
        Some(610_000),
        "the earlier of the two"
    );
}

#[test]
fn cancel_ends_a_queued_execution_and_one_in_progress_only_when_forced() {
    let mut jobs = given_queued(&["a", "b"], 0);
    run(&mut jobs, |j| {
        decide_start_next(j, &StartNext::default(), 1_000, &LIMITS)
    });
    let canceled = execution(run(&mut jobs, |j| {
        decide_cancel(j, "b", false, 2_000, &LIMITS)
    }));
    assert_eq!(canceled.status, JobExecutionStatus::Canceled);
    let decision = decide_cancel(&jobs, "a", false, 2_000, &LIMITS);
    assert_eq!(
        refusal(decision.outcome).rejection.kind,
        RejectionKind::InvalidStateTransition
    );
    let forced = execution(run(&mut jobs, |j| {
        decide_cancel(j, "a", true, 2_000, &LIMITS)
    }));
    assert_eq!(forced.status, JobExecutionStatus::Canceled);
    assert!(jobs.pending.is_empty());
}

#[test]
fn remove_ends_a_pending_execution_and_drops_a_finished_one_from_the_state() {
    let mut jobs = given_queued(&["a", "b"], 0);
    let removed = execution(run(&mut jobs, |j| {
        decide_remove(j, "a", false, 1_000, &LIMITS)
    }));
    assert_eq!(removed.status, JobExecutionStatus::Removed);
    run(&mut jobs, |j| {
        decide_update(j, &update("b", "FAILED"), 1_000, &LIMITS)
    });
    assert_eq!(
        run(&mut jobs, |j| decide_remove(j, "b", false, 2_000, &LIMITS)),
        JobOutcome::Execution(None)
    );
    assert!(jobs.get("b").is_none());
    let decision = decide_remove(&jobs, "b", false, 2_000, &LIMITS);
    assert_eq!(
        refusal(decision.outcome).rejection.kind,
        RejectionKind::ExecutionNotFound
    );
}

#[test]
fn queueing_is_bounded_and_refuses_a_second_pending_execution_of_a_job() {
    let jobs = given_queued(&["a", "b", "c"], 0);
    let refused = |queue: &QueueJob| {
        decide_queue(&jobs, queue, 1_000, &LIMITS)
            .expect_err("refused")
            .kind
    };
    assert_eq!(refused(&queue("d", None)), RejectionKind::TooManyRequests);
    let small = given_queued(&["a"], 0);
    assert_eq!(
        decide_queue(&small, &queue("a", None), 1_000, &LIMITS)
            .expect_err("refused")
            .kind,
        RejectionKind::AlreadyExists
    );
    let mut big = queue("big", None);
    std::sync::Arc::make_mut(&mut big.document).insert("blob".into(), "x".repeat(300).into());
    assert_eq!(
        decide_queue(&small, &big, 1_000, &LIMITS)
            .expect_err("refused")
            .kind,
        RejectionKind::PayloadTooLarge
    );
    assert_eq!(
        decide_queue(&small, &queue("bad/id", None), 1_000, &LIMITS)
            .expect_err("refused")
            .kind,
        RejectionKind::InvalidRequest
    );
    // Once finished, the job may run here again (its next execution).
    let mut jobs = small;
    run(&mut jobs, |j| {
        decide_update(j, &update("a", "SUCCEEDED"), 1_000, &LIMITS)
    });
    let mut again = queue("a", None);
    again.execution_number = 2;
    let requeued = execution(run(&mut jobs, |j| {
        decide_queue(j, &again, 2_000, &LIMITS).expect("queued")
    }));
    assert_eq!((requeued.execution_number, requeued.version_number), (2, 1));
}

#[test]
fn notify_lists_at_most_15_in_progress_first_and_the_head_is_what_start_next_takes() {
    let limits = JobLimits {
        pending_max: 20,
        ..LIMITS
    };
    let mut jobs = JobExecutions::default();
    for i in 0..18 {
        let decision =
            decide_queue(&jobs, &queue(&format!("j{i:02}"), None), i, &limits).expect("queued");
        run(&mut jobs, |_| decision);
    }
    run(&mut jobs, |j| {
        decide_update(j, &update("j05", "IN_PROGRESS"), 100, &limits)
    });
    let notify = jobs.notify_json();
    let in_progress = notify["jobs"]["IN_PROGRESS"].as_array().expect("list");
    let queued = notify["jobs"]["QUEUED"].as_array().expect("list");
    assert_eq!(in_progress.len(), 1);
    assert_eq!(in_progress[0]["jobId"], "j05");
    assert_eq!(queued.len(), 14, "15 in all");
    assert_eq!(queued[0]["jobId"], "j00");
    assert_eq!(jobs.pending_view().head(), Some("j05"));
    let pending = jobs.pending_json();
    assert_eq!(pending["queuedJobs"].as_array().map(Vec::len), Some(17));
    assert_eq!(JobExecutions::default().notify_json(), json!({"jobs": {}}));
}

#[test]
fn device_fields_are_checked() {
    assert!(parse_status_details(Some(&json!({"a": 1})), &LIMITS).is_err());
    assert!(parse_status_details(Some(&json!("x")), &LIMITS).is_err());
    assert_eq!(
        parse_status_details(Some(&json!({"k": "x".repeat(100)})), &LIMITS)
            .expect_err("too big")
            .kind,
        RejectionKind::PayloadTooLarge
    );
    assert_eq!(parse_status_details(None, &LIMITS), Ok(None));
    for bad in [json!(0), json!(10_081), json!(1.5), json!("5")] {
        assert!(parse_step_timeout(Some(&bad)).is_err(), "{bad}");
    }
    assert_eq!(parse_step_timeout(Some(&json!(10_080))), Ok(Some(10_080)));
}

// ---- proptest: any interleaving keeps the laws, and the events replay to the same state ----

#[derive(Debug, Clone)]
enum Op {
    Queue(u8, Option<u64>),
    StartNext(Option<u64>),
    Update(u8, &'static str, Option<u64>, Option<u64>),
    Cancel(u8, bool),
    Remove(u8, bool),
    Fire,
    Wait(u64),
}

fn op() -> impl Strategy<Value = Op> {
    let job = 0u8..4;
    let status = prop::sample::select(vec![
        "IN_PROGRESS",
        "SUCCEEDED",
        "FAILED",
        "REJECTED",
        "QUEUED",
        "TIMED_OUT",
        "BOGUS",
    ]);
    prop_oneof![
        (job.clone(), prop::option::of(1u64..120)).prop_map(|(j, t)| Op::Queue(j, t)),
        prop::option::of(1u64..3).prop_map(Op::StartNext),
        (
            job.clone(),
            status,
            prop::option::of(1u64..6),
            prop::option::of(1u64..3)
        )
            .prop_map(|(j, s, v, t)| Op::Update(j, s, v, t)),
        (job.clone(), any::<bool>()).prop_map(|(j, f)| Op::Cancel(j, f)),
        (job, any::<bool>()).prop_map(|(j, f)| Op::Remove(j, f)),
        Just(Op::Fire),
        (0u64..200_000).prop_map(Op::Wait),
    ]
}

proptest! {
    #[test]
    fn any_interleaving_keeps_the_laws_and_replays_to_the_same_state(ops in prop::collection::vec(op(), 1..60)) {
        let mut jobs = JobExecutions::default();
        let mut log: Vec<JobEvent> = Vec::new();
        let mut now = 0u64;
        let mut numbers: BTreeMap<String, u64> = BTreeMap::new();
        for op in ops {
            let decision = match op {
                Op::Wait(ms) => { now += ms; continue; }
                Op::Queue(j, timeout) => {
                    let id = format!("j{j}");
                    let number = numbers.get(&id).copied().unwrap_or(0) + 1;
                    let request = QueueJob { execution_number: number, ..queue(&id, timeout) };
                    match decide_queue(&jobs, &request, now, &LIMITS) {
                        Ok(decision) => { numbers.insert(id, number); decision }
                        Err(_) => continue,
                    }
                }
                Op::StartNext(t) => decide_start_next(&jobs, &StartNext { status_details: None, step_timeout_minutes: t }, now, &LIMITS),
                Op::Update(j, status, version, t) => decide_update(&jobs, &JobUpdate {
                    expected_version: version,
                    step_timeout_minutes: t,
                    ..update(&format!("j{j}"), status)
                }, now, &LIMITS),
                Op::Cancel(j, force) => decide_cancel(&jobs, &format!("j{j}"), force, now, &LIMITS),
                Op::Remove(j, force) => decide_remove(&jobs, &format!("j{j}"), force, now, &LIMITS),
                Op::Fire => decide_fire(&jobs, now, &LIMITS),
            };
            // A refusal records nothing but the time-outs found on the way.
            if matches!(decision.outcome, JobOutcome::Refused(_)) {
                prop_assert!(decision.events.iter().all(|e| matches!(e, JobEvent::TimedOut(_))));
            }
            for event in &decision.events {
                match event {
                    // Only pending executions change, and each change adds exactly one version.
                    JobEvent::Updated(JobUpdated { job_id, .. })
                    | JobEvent::TimedOut(JobFinished { job_id, .. })
                    | JobEvent::Canceled(JobFinished { job_id, .. }) => {
                        let before = jobs.pending.get(job_id).map(|e| e.version_number);
                        prop_assert!(before.is_some(), "{event:?} on an execution not pending");
                        jobs.apply(event);
                        if let Some(after) = jobs.get(job_id) {
                            prop_assert_eq!(Some(after.version_number), before.map(|v| v + 1));
                        }
                    }
                    JobEvent::Queued(_) | JobEvent::Removed(_) => jobs.apply(event),
                }
                log.push(event.clone());
            }
            prop_assert!(jobs.pending.len() <= LIMITS.pending_max);
            prop_assert!(jobs.finished.len() <= LIMITS.finished_kept_max as usize);
            prop_assert!(jobs.pending.values().all(|e| !e.status.is_terminal()));
            prop_assert!(jobs.finished.iter().all(|e| e.status.is_terminal()));
        }
        let mut replayed = JobExecutions::default();
        for event in &log {
            replayed.apply(event);
        }
        prop_assert_eq!(replayed, jobs);
    }

    #[test]
    fn fire_leaves_no_execution_past_its_deadline(ops in prop::collection::vec(op(), 1..40), later in 0u64..2_000_000) {
        let mut jobs = JobExecutions::default();
        let mut now = 0u64;
        for op in ops {
            let decision = match op {
                Op::Wait(ms) => { now += ms; continue; }
                Op::Queue(j, timeout) => match decide_queue(&jobs, &queue(&format!("j{j}"), timeout), now, &LIMITS) {
                    Ok(decision) => decision,
                    Err(_) => continue,
                },
                Op::StartNext(t) => decide_start_next(&jobs, &StartNext { status_details: None, step_timeout_minutes: t }, now, &LIMITS),
                _ => continue,
            };
            run(&mut jobs, |_| decision);
        }
        let at = now + later;
        run(&mut jobs, |j| decide_fire(j, at, &LIMITS));
        prop_assert!(jobs.next_deadline_ms().is_none_or(|deadline| deadline > at));
    }
}
