//! Fleet jobs end to end: an operator creates a job over HTTP, devices over MQTT are notified,
//! start it, report, and the job completes with its counts; version and terminal-state
//! refusals; cancel with and without force; bad requests.

mod common;

use std::time::{Duration, Instant};

use common::device::{Device, WAIT};
use common::{call, create, register_device, Server};
use reqwest::Method;
use serde_json::{json, Value};

/// The next publish on `topic` (others on the device's subscriptions are skipped).
async fn next_on(device: &mut Device, topic: &str) -> Value {
    loop {
        let (got, body) = device.next().await;
        if got == topic {
            return body;
        }
    }
}

async fn job(server: &Server, job_id: &str) -> Value {
    let (status, body) = call(
        Method::GET,
        &server.url(&format!("/api/v1/jobs/{job_id}")),
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    body
}

/// Polls (bounded) until `done` holds for the job.
async fn wait_for_job(server: &Server, job_id: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + WAIT;
    loop {
        let body = job(server, job_id).await;
        if done(&body) {
            return body;
        }
        assert!(Instant::now() < deadline, "job never got there: {body}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn device(server: &Server, name: &str) -> Device {
    register_device(server, name, "pw").await;
    let (mut device, _) = Device::connect(server, name, (name, "pw"), true).await;
    device
        .subscribe(&format!("$emqx/things/{name}/jobs/#"))
        .await;
    device
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_run_a_job_and_it_completes_with_its_counts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), &[]);
    let mut lamp = device(&server, "lamp").await;
    let mut fan = device(&server, "fan").await;
    let created = create(
        &server,
        "/api/v1/jobs",
        json!({"jobId": "fw-2", "document": {"firmware": "2.0"},
               "targets": {"thingNames": ["lamp", "fan"]}}),
    )
    .await;
    assert_eq!(created["status"], "IN_PROGRESS");
    assert_eq!(created["targets"], 2);

    for (device, name) in [(&mut lamp, "lamp"), (&mut fan, "fan")] {
        let jobs = format!("$emqx/things/{name}/jobs");
        let next = next_on(device, &format!("{jobs}/notify-next")).await;
        assert_eq!(next["execution"]["jobId"], "fw-2");
        assert_eq!(next["execution"]["jobDocument"], json!({"firmware": "2.0"}));
        device
            .publish(
                &format!("{jobs}/start-next"),
                json!({"clientToken": "s", "statusDetails": {"step": "download"}}).to_string(),
            )
            .await;
        let started = next_on(device, &format!("{jobs}/start-next/accepted")).await;
        assert_eq!(started["execution"]["status"], "IN_PROGRESS");
        assert_eq!(started["execution"]["versionNumber"], 2);
        assert_eq!(started["clientToken"], "s");
    }

    // A stale version is refused with the current state; the terminal update wins once.
    let jobs = "$emqx/things/lamp/jobs";
    lamp.publish(
        &format!("{jobs}/fw-2/update"),
        json!({"status": "SUCCEEDED", "expectedVersion": 1}).to_string(),
    )
    .await;
    let refused = next_on(&mut lamp, &format!("{jobs}/fw-2/update/rejected")).await;
    assert_eq!(refused["code"], "VersionMismatch");
    assert_eq!(refused["executionState"]["versionNumber"], 2);
    let done = json!({"status": "SUCCEEDED", "expectedVersion": 2,
                      "includeJobExecutionState": true})
    .to_string();
    lamp.publish(&format!("{jobs}/fw-2/update"), done.clone())
        .await;
    let accepted = next_on(&mut lamp, &format!("{jobs}/fw-2/update/accepted")).await;
    assert_eq!(accepted["executionState"]["status"], "SUCCEEDED");
    lamp.publish(&format!("{jobs}/fw-2/update"), done).await;
    let refused = next_on(&mut lamp, &format!("{jobs}/fw-2/update/rejected")).await;
    assert_eq!(refused["code"], "TerminalStateReached");

    fan.publish(
        "$emqx/things/fan/jobs/fw-2/update",
        json!({"status": "FAILED", "statusDetails": {"why": "disk full"}}).to_string(),
    )
    .await;
    next_on(&mut fan, "$emqx/things/fan/jobs/fw-2/update/accepted").await;

    let completed = wait_for_job(&server, "fw-2", |j| j["status"] == "COMPLETED").await;
    let details = &completed["jobProcessDetails"];
    assert_eq!(details["numberOfSucceededThings"], 1, "{completed}");
    assert_eq!(details["numberOfFailedThings"], 1, "{completed}");
    assert_eq!(details["numberOfInProgressThings"], 0, "{completed}");

    let (status, executions) = call(
        Method::GET,
        &server.url("/api/v1/jobs/fw-2/executions?status=FAILED"),
        None,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(
        executions["items"],
        json!([{"thingName": "fan", "status": "FAILED"}])
    );
    let (status, of_thing) = call(Method::GET, &server.url("/api/v1/things/fan/jobs"), None).await;
    assert_eq!(status, 200);
    assert_eq!(
        of_thing["items"][0]["statusDetails"],
        json!({"why": "disk full"})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_ends_queued_executions_and_those_in_progress_only_when_forced() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), &[]);
    let mut lamp = device(&server, "lamp").await;
    let _fan = device(&server, "fan").await;
    create(
        &server,
        "/api/v1/jobs",
        json!({"jobId": "cfg", "document": {"x": 1}, "targets": {"thingNames": ["lamp", "fan"]}}),
    )
    .await;
    let jobs = "$emqx/things/lamp/jobs";
    next_on(&mut lamp, &format!("{jobs}/notify-next")).await;
    lamp.publish(&format!("{jobs}/start-next"), "").await;
    next_on(&mut lamp, &format!("{jobs}/start-next/accepted")).await;
    wait_for_job(&server, "cfg", |j| {
        j["jobProcessDetails"]["numberOfInProgressThings"] == 1
            && j["jobProcessDetails"]["numberOfQueuedThings"] == 1
    })
    .await;

    let (status, canceled) = call(
        Method::POST,
        &server.url("/api/v1/jobs/cfg/cancel"),
        Some(json!({"reasonCode": "bad-config"})),
    )
    .await;
    assert_eq!(status, 200, "{canceled}");
    assert_eq!(canceled["status"], "CANCELED");
    wait_for_job(&server, "cfg", |j| {
        j["jobProcessDetails"]["numberOfCanceledThings"] == 1
            && j["jobProcessDetails"]["numberOfInProgressThings"] == 1
    })
    .await;

    let (status, _) = call(
        Method::POST,
        &server.url("/api/v1/jobs/cfg/cancel"),
        Some(json!({"force": true})),
    )
    .await;
    assert_eq!(status, 200);
    let forced = wait_for_job(&server, "cfg", |j| {
        j["jobProcessDetails"]["numberOfCanceledThings"] == 2
    })
    .await;
    assert_eq!(forced["forceCanceled"], true);
    // The device learns that nothing is next any more.
    let next = next_on(&mut lamp, &format!("{jobs}/notify-next")).await;
    assert!(next.get("execution").is_none(), "{next}");
    let (status, body) = call(
        Method::POST,
        &server.url("/api/v1/jobs/cfg/cancel"),
        Some(json!({"force": true})),
    )
    .await;
    assert_eq!(status, 409, "{body}");
    // An operator removes the (finished) execution from the Thing.
    let (status, _) = call(
        Method::DELETE,
        &server.url("/api/v1/things/lamp/jobs/cfg"),
        None,
    )
    .await;
    assert_eq!(status, 204);
    let (_, of_thing) = call(Method::GET, &server.url("/api/v1/things/lamp/jobs"), None).await;
    assert_eq!(of_thing["items"], json!([]));
    let (status, _) = call(
        Method::DELETE,
        &server.url("/api/v1/things/lamp/jobs/cfg"),
        None,
    )
    .await;
    assert_eq!(status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_job_requests_get_specific_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), &[]);
    register_device(&server, "lamp", "pw").await;
    let cases = [
        (
            json!({"document": {}, "targets": {"thingNames": ["ghost"]}}),
            404,
        ),
        (json!({"targets": {"thingNames": ["lamp"]}}), 400),
        (
            json!({"document": [], "targets": {"thingNames": ["lamp"]}}),
            400,
        ),
        (json!({"document": {}, "targets": {"thingNames": []}}), 400),
        (
            json!({"document": {}, "targets": {"thingNames": ["bad name"]}}),
            400,
        ),
        (
            json!({"document": {}, "targets": {"thingGroupNames": ["g"]}}),
            404,
        ),
        (
            json!({"document": {}, "targets": {"thingNames": ["lamp"]}, "rollout": {}}),
            400,
        ),
        (
            json!({"document": {}, "targets": {"thingNames": ["lamp"]}, "targetSelection": "CONTINUOUS"}),
            400,
        ),
        (
            json!({"document": {}, "targets": {"thingNames": ["lamp"]}, "rollout": {"maximumPerMinute": 10, "burst": 2}}),
            400,
        ),
        (
            json!({"document": {}, "targets": {"thingNames": ["lamp"]}, "rollout": {"exponentialRate":
                {"baseRatePerMinute": 10, "incrementFactor": 1.55, "rateIncreaseCriteria": {"numberOfNotifiedThings": 5}}}}),
            400,
        ),
        (
            json!({"document": {}, "targets": {"thingNames": ["lamp"]}, "rollout": {"exponentialRate":
                {"baseRatePerMinute": 10, "incrementFactor": 2, "rateIncreaseCriteria":
                    {"numberOfNotifiedThings": 5, "numberOfSucceededThings": 5}}}}),
            400,
        ),
        (
            json!({"document": {}, "targets": {"thingNames": ["lamp"]}, "rollout": {"maximumPerMinute": 5, "exponentialRate":
                {"baseRatePerMinute": 10, "incrementFactor": 2, "rateIncreaseCriteria": {"numberOfSucceededThings": 5}}}}),
            400,
        ),
        (
            json!({"document": {}, "targets": {"thingNames": ["lamp"]}, "timeoutConfig": {"inProgressTimeoutInMinutes": 0}}),
            400,
        ),
        (
            json!({"document": {}, "targets": {"thingNames": ["lamp"]}, "jobId": "no/slash"}),
            400,
        ),
        (
            json!({"document": {"big": "x".repeat(40_000)}, "targets": {"thingNames": ["lamp"]}}),
            413,
        ),
    ];
    for (body, want) in cases {
        let (status, answer) = call(
            Method::POST,
            &server.url("/api/v1/jobs"),
            Some(body.clone()),
        )
        .await;
        assert_eq!(status, want, "{body} -> {answer}");
        assert!(
            answer["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{answer}"
        );
    }
    create(
        &server,
        "/api/v1/jobs",
        json!({"jobId": "j1", "document": {}, "targets": {"thingNames": ["lamp"]}}),
    )
    .await;
    let (status, _) = call(
        Method::POST,
        &server.url("/api/v1/jobs"),
        Some(json!({"jobId": "j1", "document": {}, "targets": {"thingNames": ["lamp"]}})),
    )
    .await;
    assert_eq!(status, 409);
    let (status, _) = call(Method::GET, &server.url("/api/v1/jobs/nope"), None).await;
    assert_eq!(status, 404);
    let (status, listed) = call(
        Method::GET,
        &server.url("/api/v1/jobs?status=IN_PROGRESS"),
        None,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(listed["items"][0]["jobId"], "j1");
    let (status, _) = call(Method::GET, &server.url("/api/v1/jobs?status=DONE"), None).await;
    assert_eq!(status, 400);
}

/// kill -9 right after a job is created (its rollout may not have queued anything) and right
/// after its last execution succeeded (its counts may not have followed): after each restart
/// the rollout goes on and the counts converge.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_and_the_counts_resume_after_kill_9() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), &[]);
    register_device(&server, "lamp", "pw").await;
    create(
        &server,
        "/api/v1/jobs",
        json!({"jobId": "j", "document": {"v": 1}, "targets": {"thingNames": ["lamp"]}}),
    )
    .await;
    server.kill9();

    let server = Server::start(dir.path(), &[]);
    let deadline = Instant::now() + WAIT;
    loop {
        let (_, of_thing) = call(Method::GET, &server.url("/api/v1/things/lamp/jobs"), None).await;
        if of_thing["items"][0]["status"] == "QUEUED" {
            break;
        }
        assert!(Instant::now() < deadline, "never queued: {of_thing}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (mut lamp, _) = Device::connect(&server, "lamp", ("lamp", "pw"), true).await;
    lamp.subscribe("$emqx/things/lamp/jobs/#").await;
    lamp.publish(
        "$emqx/things/lamp/jobs/j/update",
        json!({"status": "SUCCEEDED"}).to_string(),
    )
    .await;
    next_on(&mut lamp, "$emqx/things/lamp/jobs/j/update/accepted").await;
    server.kill9();

    let server = Server::start(dir.path(), &[]);
    let done = wait_for_job(&server, "j", |j| j["status"] == "COMPLETED").await;
    assert_eq!(
        done["jobProcessDetails"]["numberOfSucceededThings"], 1,
        "{done}"
    );
    assert_eq!(
        done["jobProcessDetails"]["numberOfQueuedThings"], 0,
        "{done}"
    );
}

/// A device without MQTT runs a job over HTTPS: the same documents and refusals, the AWS code
/// beside the HTTP status.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_only_device_runs_a_job() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), &[]);
    register_device(&server, "meter", "pw").await;
    create(
        &server,
        "/api/v1/jobs",
        json!({"jobId": "cal", "document": {"calibrate": true}, "targets": {"thingNames": ["meter"]}}),
    )
    .await;
    let base = "/api/v1/thing-datas/meter/jobs";
    let deadline = Instant::now() + WAIT;
    loop {
        let (status, pending) = call(Method::GET, &server.url(base), None).await;
        assert_eq!(status, 200, "{pending}");
        if pending["queuedJobs"][0]["jobId"] == "cal" {
            break;
        }
        assert!(Instant::now() < deadline, "never queued: {pending}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (status, started) = call(
        Method::POST,
        &server.url(&format!("{base}/start-next")),
        Some(json!({"stepTimeoutInMinutes": 30, "clientToken": "t"})),
    )
    .await;
    assert_eq!(status, 200, "{started}");
    assert_eq!(
        started["execution"]["jobDocument"],
        json!({"calibrate": true})
    );
    assert_eq!(started["clientToken"], "t");
    let (status, refused) = call(
        Method::POST,
        &server.url(&format!("{base}/cal/update")),
        Some(json!({"status": "SUCCEEDED", "expectedVersion": 7})),
    )
    .await;
    assert_eq!(status, 409, "{refused}");
    assert_eq!(refused["errorCode"], "VersionMismatch");
    assert_eq!(refused["executionState"]["status"], "IN_PROGRESS");
    let (status, done) = call(
        Method::POST,
        &server.url(&format!("{base}/cal/update")),
        Some(json!({"status": "SUCCEEDED", "includeJobExecutionState": true})),
    )
    .await;
    assert_eq!(status, 200, "{done}");
    assert_eq!(done["executionState"]["status"], "SUCCEEDED");
    let (status, described) = call(
        Method::GET,
        &server.url(&format!("{base}/cal?includeJobDocument=false")),
        None,
    )
    .await;
    assert_eq!(status, 200);
    assert!(described["execution"].get("jobDocument").is_none());
    let (status, missing) = call(Method::GET, &server.url(&format!("{base}/other")), None).await;
    assert_eq!(status, 404, "{missing}");
    assert_eq!(missing["errorCode"], "ResourceNotFound");
    let (status, _) = call(
        Method::GET,
        &server.url("/api/v1/thing-datas/ghost/jobs"),
        None,
    )
    .await;
    assert_eq!(status, 404);
    wait_for_job(&server, "cal", |j| j["status"] == "COMPLETED").await;
}

/// Canceled at once after it was created (before the counts saw any execution): every
/// execution that was queued ends CANCELED, and the rollout queues no more. A target deleted meanwhile counts as REMOVED, so a job whose
/// Things go away completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_canceled_at_once_leaves_no_execution_running_and_deleted_targets_count_as_removed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), &[]);
    let names: Vec<String> = (0..20).map(|i| format!("t{i:02}")).collect();
    for name in &names {
        create(&server, "/api/v1/things", json!({"thingName": name})).await;
    }
    create(
        &server,
        "/api/v1/jobs",
        json!({"jobId": "quick", "document": {}, "targets": {"thingNames": names}}),
    )
    .await;
    let (status, _) = call(Method::POST, &server.url("/api/v1/jobs/quick/cancel"), None).await;
    assert_eq!(status, 200);
    // Every target either never got an execution (the rollout stopped) or has it CANCELED.
    let deadline = Instant::now() + WAIT;
    loop {
        let mut running = Vec::new();
        for name in &names {
            let (_, of_thing) = call(
                Method::GET,
                &server.url(&format!("/api/v1/things/{name}/jobs")),
                None,
            )
            .await;
            let items = of_thing["items"].as_array().cloned().unwrap_or_default();
            running.extend(
                items
                    .into_iter()
                    .filter(|e| e["jobId"] == "quick" && e["status"] != "CANCELED"),
            );
        }
        let (_, listed) = call(
            Method::GET,
            &server.url("/api/v1/jobs/quick/executions?limit=100"),
            None,
        )
        .await;
        let counted = listed["items"].as_array().is_some_and(|items| {
            items
                .iter()
                .all(|t| t["status"] == "NOT_QUEUED" || t["status"] == "CANCELED")
        });
        if running.is_empty() && counted {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "left running: {running:?} / {listed}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    create(
        &server,
        "/api/v1/jobs",
        json!({"jobId": "gone", "document": {}, "targets": {"thingNames": ["t00", "t01"]}}),
    )
    .await;
    wait_for_job(&server, "gone", |j| {
        j["jobProcessDetails"]["numberOfQueuedThings"] == 2
    })
    .await;
    for name in ["t00", "t01"] {
        let (status, _) = call(
            Method::DELETE,
            &server.url(&format!("/api/v1/things/{name}")),
            None,
        )
        .await;
        assert_eq!(status, 204);
    }
    let done = wait_for_job(&server, "gone", |j| j["status"] == "COMPLETED").await;
    assert_eq!(
        done["jobProcessDetails"]["numberOfRemovedThings"], 2,
        "{done}"
    );
}

/// The time a Thing's execution of `job` was queued, Unix ms, from its history (bounded wait).
async fn queued_at(server: &Server, thing: &str) -> u64 {
    let deadline = Instant::now() + WAIT;
    loop {
        let (_, history) = call(
            Method::GET,
            &server.url(&format!("/api/v1/things/{thing}/history")),
            None,
        )
        .await;
        let found = history
            .as_array()
            .or_else(|| history["items"].as_array())
            .and_then(|items| items.iter().find(|e| e["type"] == "JobQueued"))
            .and_then(|e| e["recordedAt"].as_u64());
        if let Some(at) = found {
            return at;
        }
        assert!(Instant::now() < deadline, "{thing} never queued: {history}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `rollout.maximumPerMinute` holds: 120 a minute queues one execution every 500 ms.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_rate_holds() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), &[]);
    for name in ["r0", "r1", "r2"] {
        create(&server, "/api/v1/things", json!({"thingName": name})).await;
    }
    let created = create(
        &server,
        "/api/v1/jobs",
        json!({"jobId": "paced", "document": {}, "targets": {"thingNames": ["r0", "r1", "r2"]},
               "rollout": {"maximumPerMinute": 120}}),
    )
    .await;
    assert_eq!(created["rollout"]["maximumPerMinute"], 120);
    let mut times = Vec::new();
    for name in ["r0", "r1", "r2"] {
        times.push(queued_at(&server, name).await);
    }
    times.sort_unstable();
    assert!(
        times[2] - times[0] >= 1_000,
        "three executions at 120/min span at least 1 s: {times:?}"
    );
}

/// `rollout.exponentialRate`: 60 a minute, doubled after every 2 Things notified (up to 600):
/// the first two are a second apart, the next at 120 a minute, and the job shows the rate it
/// reached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exponential_rollout_rate_rises_with_the_things_notified() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), &[]);
    let names = ["x0", "x1", "x2", "x3", "x4"];
    for name in names {
        create(&server, "/api/v1/things", json!({"thingName": name})).await;
    }
    let created = create(
        &server,
        "/api/v1/jobs",
        json!({"jobId": "ramp", "document": {}, "targets": {"thingNames": names},
               "rollout": {"maximumPerMinute": 600, "exponentialRate": {"baseRatePerMinute": 60,
                   "incrementFactor": 2.0, "rateIncreaseCriteria": {"numberOfNotifiedThings": 2}}}}),
    )
    .await;
    assert_eq!(
        created["rollout"]["exponentialRate"]["baseRatePerMinute"],
        60
    );
    assert_eq!(created["rollout"]["currentRatePerMinute"], 60);
    let mut times = Vec::new();
    for name in names {
        times.push(queued_at(&server, name).await);
    }
    times.sort_unstable();
    assert!(times[1] - times[0] >= 1_000, "60/min at first: {times:?}");
    assert!(times[3] - times[2] >= 500, "120/min after 2: {times:?}");
    // 2 more notified after the first raise, then the last queue request: 240 a minute.
    let ramped = wait_for_job(&server, "ramp", |j| {
        j["rollout"]["currentRatePerMinute"] == 240
    })
    .await;
    assert_eq!(ramped["rollout"]["maximumPerMinute"], 600, "{ramped}");
}

/// An abort criterion cancels the job once enough executed Things failed; the executions not
/// started yet end CANCELED.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_failures_abort_the_job() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), &[]);
    let mut a = device(&server, "a").await;
    let mut b = device(&server, "b").await;
    for name in ["c", "d"] {
        create(&server, "/api/v1/things", json!({"thingName": name})).await;
    }
    create(
        &server,
        "/api/v1/jobs",
        json!({"jobId": "risky", "document": {}, "targets": {"thingNames": ["a", "b", "c", "d"]},
               "abortConfig": {"criteriaList": [{"failureType": "ALL", "action": "CANCEL",
                   "thresholdPercentage": 50, "minNumberOfExecutedThings": 2}]}}),
    )
    .await;
    for (device, name) in [(&mut a, "a"), (&mut b, "b")] {
        let jobs = format!("$emqx/things/{name}/jobs");
        next_on(device, &format!("{jobs}/notify-next")).await;
        device
            .publish(
                &format!("{jobs}/risky/update"),
                json!({"status": "FAILED"}).to_string(),
            )
            .await;
        next_on(device, &format!("{jobs}/risky/update/accepted")).await;
    }
    let aborted = wait_for_job(&server, "risky", |j| {
        j["status"] == "CANCELED" && j["jobProcessDetails"]["numberOfCanceledThings"] == 2
    })
    .await;
    assert!(
        aborted["reasonCode"]
            .as_str()
            .is_some_and(|r| r.starts_with("aborted")),
        "{aborted}"
    );
    assert_eq!(aborted["jobProcessDetails"]["numberOfFailedThings"], 2);
}

/// Thing groups: a job to a group reaches its members; a CONTINUOUS one also reaches a Thing
/// added to the group later; a Thing lists its groups.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_target_groups_and_continuous_jobs_reach_later_members() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), &[]);
    for name in ["g1", "g2", "late"] {
        create(&server, "/api/v1/things", json!({"thingName": name})).await;
    }
    create(
        &server,
        "/api/v1/thing-groups",
        json!({"groupName": "pumps", "description": "all pumps"}),
    )
    .await;
    for name in ["g1", "g2"] {
        let (status, _) = call(
            Method::POST,
            &server.url("/api/v1/thing-groups/pumps/things"),
            Some(json!({"thingName": name})),
        )
        .await;
        assert_eq!(status, 201);
    }
    let (status, _) = call(
        Method::POST,
        &server.url("/api/v1/thing-groups/pumps/things"),
        Some(json!({"thingName": "ghost"})),
    )
    .await;
    assert_eq!(status, 404);
    let (_, members) = call(
        Method::GET,
        &server.url("/api/v1/thing-groups/pumps/things"),
        None,
    )
    .await;
    assert_eq!(members["items"], json!(["g1", "g2"]));
    let (_, g1) = call(Method::GET, &server.url("/api/v1/things/g1"), None).await;
    assert_eq!(g1["thingGroups"], json!(["pumps"]));

    let snapshot = create(
        &server,
        "/api/v1/jobs",
        json!({"jobId": "snap", "document": {}, "targets": {"thingGroupNames": ["pumps"]}}),
    )
    .await;
    assert_eq!(snapshot["targets"], 2);
    let continuous = create(
        &server,
        "/api/v1/jobs",
        json!({"jobId": "cont", "document": {}, "targets": {"thingGroupNames": ["pumps"]},
               "targetSelection": "CONTINUOUS"}),
    )
    .await;
    assert_eq!(continuous["targetSelection"], "CONTINUOUS");
    wait_for_job(&server, "cont", |j| {
        j["jobProcessDetails"]["numberOfQueuedThings"] == 2
    })
    .await;

    let (status, _) = call(
        Method::POST,
        &server.url("/api/v1/thing-groups/pumps/things"),
        Some(json!({"thingName": "late"})),
    )
    .await;
    assert_eq!(status, 201);
    let reached = wait_for_job(&server, "cont", |j| {
        j["targets"] == 3 && j["jobProcessDetails"]["numberOfQueuedThings"] == 3
    })
    .await;
    assert_eq!(reached["status"], "IN_PROGRESS");
    assert_eq!(
        job(&server, "snap").await["targets"],
        2,
        "a SNAPSHOT job does not grow"
    );

    let (status, _) = call(
        Method::DELETE,
        &server.url("/api/v1/thing-groups/pumps/things/late"),
        None,
    )
    .await;
    assert_eq!(status, 204);
    let (status, _) = call(
        Method::DELETE,
        &server.url("/api/v1/thing-groups/pumps"),
        None,
    )
    .await;
    assert_eq!(status, 204);
    let (status, _) = call(Method::GET, &server.url("/api/v1/thing-groups/pumps"), None).await;
    assert_eq!(status, 404);
    let (_, g1) = call(Method::GET, &server.url("/api/v1/things/g1"), None).await;
    assert_eq!(g1["thingGroups"], json!([]));

    // `thinghub check` knows every record jobs and groups store.
    create(
        &server,
        "/api/v1/thing-groups",
        json!({"groupName": "kept"}),
    )
    .await;
    let (status, _) = call(
        Method::POST,
        &server.url("/api/v1/thing-groups/kept/things"),
        Some(json!({"thingName": "g1"})),
    )
    .await;
    assert_eq!(status, 201);
    let (exit, _) = server.stop();
    assert!(exit.success());
    common::assert_check_finds_no_problem(dir.path());
}

/// A step timeout is durable: the device starts its execution with a one-minute step timeout,
/// the server is killed with -9, and after the restart (nobody touching the Thing, so only the
/// deadline index can wake it) the execution ends TIMED_OUT and the job counts it. Takes a
/// minute: one minute is the shortest step timeout the contract allows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_timeout_fires_after_kill_9() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), &[]);
    let mut lamp = device(&server, "lamp").await;
    create(
        &server,
        "/api/v1/jobs",
        json!({"jobId": "slow", "document": {}, "targets": {"thingNames": ["lamp"]}}),
    )
    .await;
    let jobs = "$emqx/things/lamp/jobs";
    next_on(&mut lamp, &format!("{jobs}/notify-next")).await;
    lamp.publish(
        &format!("{jobs}/start-next"),
        json!({"stepTimeoutInMinutes": 1}).to_string(),
    )
    .await;
    let started = next_on(&mut lamp, &format!("{jobs}/start-next/accepted")).await;
    assert_eq!(started["execution"]["status"], "IN_PROGRESS", "{started}");
    let started_at = Instant::now();
    drop(lamp);
    server.kill9();

    let server = Server::start(dir.path(), &[]);
    let deadline = started_at + Duration::from_secs(60) + WAIT;
    let timed_out = loop {
        let job = job(&server, "slow").await;
        if job["jobProcessDetails"]["numberOfTimedOutThings"] == 1 {
            break job;
        }
        assert!(
            Instant::now() < deadline,
            "the step timer never fired: {job}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert!(
        started_at.elapsed() >= Duration::from_secs(59),
        "fired before its minute: {:?}",
        started_at.elapsed()
    );
    assert_eq!(timed_out["status"], "COMPLETED", "{timed_out}");
    let (_, of_thing) = call(Method::GET, &server.url("/api/v1/things/lamp/jobs"), None).await;
    assert_eq!(of_thing["items"][0]["status"], "TIMED_OUT", "{of_thing}");
}

async fn job_gauges(server: &Server) -> Value {
    let (status, metrics) = call(Method::GET, &server.url("/api/v1/metrics"), None).await;
    assert_eq!(status, 200);
    metrics["jobs"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_by_status_are_counted_as_they_change_and_again_at_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), &[]);
    let lamp = device(&server, "lamp").await;
    register_device(&server, "fan", "pw").await;
    assert_eq!(
        job_gauges(&server).await,
        json!({"inProgress": 0, "completed": 0, "canceled": 0})
    );
    for id in ["waiting", "stopped", "open"] {
        create(
            &server,
            "/api/v1/jobs",
            json!({"jobId": id, "document": {}, "targets": {"thingNames": ["fan"]}}),
        )
        .await;
    }
    create(
        &server,
        "/api/v1/jobs",
        json!({"jobId": "lamp-job", "document": {}, "targets": {"thingNames": ["lamp"]}}),
    )
    .await;
    let (status, _) = call(
        Method::POST,
        &server.url("/api/v1/jobs/stopped/cancel"),
        Some(json!({})),
    )
    .await;
    assert_eq!(status, 200);
    let jobs = "$emqx/things/lamp/jobs";
    lamp.publish(
        &format!("{jobs}/lamp-job/update"),
        r#"{"status":"SUCCEEDED"}"#,
    )
    .await;
    wait_for_job(&server, "lamp-job", |j| j["status"] == "COMPLETED").await;
    let want = json!({"inProgress": 2, "completed": 1, "canceled": 1});
    assert_eq!(job_gauges(&server).await, want);

    // A restart counts them again from the stored jobs.
    drop(lamp);
    server.stop();
    let server = Server::start(dir.path(), &[]);
    assert_eq!(job_gauges(&server).await, want);
}
