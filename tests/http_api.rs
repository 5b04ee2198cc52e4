//! The management and device HTTP APIs against the real server process.

mod common;

use common::{call, client, Server};
use reqwest::Method;
use serde_json::json;

#[tokio::test]
async fn register_report_set_desired_read_delta_and_conflict() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), &[]);

    let (status, body) = call(
        Method::POST,
        &server.url("/api/v1/things"),
        Some(json!({"thingName":"pump-1","thingType":"pump","attributes":{"site":"lab"}})),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["mqttClientId"], "pump-1");
    let (status, body) = call(
        Method::POST,
        &server.url("/api/v1/things"),
        Some(json!({"thingName":"pump-1"})),
    )
    .await;
    assert_eq!((status, body["code"].as_u64()), (409, Some(409)));

    // The device reports over the ThingDatas API.
    let (status, body) = call(
        Method::POST,
        &server.url("/api/v1/thing-datas/shadow/reported"),
        Some(json!({"thingName":"pump-1","state":{"reported":{"speed":3,"temp":21.5}},"clientToken":"c1"})),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["version"], 1);
    assert_eq!(body["clientToken"], "c1");
    assert!(body["metadata"]["reported"]["speed"]["timestamp"].is_u64());

    // The operator sets desired; the document shows the delta.
    let (status, body) = call(
        Method::POST,
        &server.url("/api/v1/things/pump-1/shadow"),
        Some(json!({"state":{"desired":{"speed":5,"temp":21.5}}})),
    )
    .await;
    assert_eq!((status, &body["version"]), (200, &json!(2)), "{body}");
    let (status, doc) = call(
        Method::GET,
        &server.url("/api/v1/thing-datas/pump-1/shadow"),
        None,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(
        doc["state"]["delta"],
        json!({"speed":5}),
        "temp agrees, only speed differs"
    );
    assert_eq!(doc["state"]["reported"], json!({"speed":3,"temp":21.5}));
    assert_eq!(doc["version"], 2);

    // A stale version is a 409 that echoes the client token.
    let (status, body) = call(
        Method::POST,
        &server.url("/api/v1/thing-datas/shadow/reported"),
        Some(json!({"thingName":"pump-1","state":{"reported":{"speed":5}},"version":1,"clientToken":"c2"})),
    )
    .await;
    assert_eq!(status, 409);
    assert_eq!(
        body,
        json!({"code":409,"message":"Version conflict","clientToken":"c2"})
    );

    // Reporting the desired value clears the delta.
    let (status, _) = call(
        Method::POST,
        &server.url("/api/v1/thing-datas/shadow/reported"),
        Some(json!({"thingName":"pump-1","state":{"reported":{"speed":5}},"version":2})),
    )
    .await;
    assert_eq!(status, 200);
    let (_, doc) = call(
        Method::GET,
        &server.url("/api/v1/things/pump-1/shadow"),
        None,
    )
    .await;
    assert!(doc["state"].get("delta").is_none(), "{doc}");
    assert_eq!(doc["version"], 3);
}

#[tokio::test]
async fn bad_input_gets_specific_errors_and_the_server_keeps_serving() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), &["--http-body-bytes-max", "4096"]);
    call(
        Method::POST,
        &server.url("/api/v1/things"),
        Some(json!({"thingName":"t"})),
    )
    .await;

    let raw = |body: Vec<u8>| {
        client()
            .post(server.url("/api/v1/things/t/shadow"))
            .basic_auth(common::ADMIN_KEY, Some(common::ADMIN_SECRET))
            .body(body)
            .send()
    };
    let check = |status: u16, code: u16, message_part: &str, response: (u16, serde_json::Value)| {
        assert_eq!(response.0, status, "{}", response.1);
        assert_eq!(response.1["code"], code, "{}", response.1);
        let message = response.1["message"].as_str().expect("message");
        assert!(
            message.contains(message_part),
            "{message:?} lacks {message_part:?}"
        );
    };
    let to_pair = |r: reqwest::Response| async move {
        let status = r.status().as_u16();
        (
            status,
            r.json::<serde_json::Value>()
                .await
                .expect("json error body"),
        )
    };

    check(
        400,
        400,
        "invalid json",
        to_pair(raw(b"{\"state\":".to_vec()).await.expect("send")).await,
    );
    check(
        415,
        415,
        "UTF-8",
        to_pair(raw(vec![0xff, 0xfe, 0x7b]).await.expect("send")).await,
    );
    check(
        413,
        413,
        "maximum size",
        to_pair(raw(vec![b' '; 5000]).await.expect("send")).await,
    );
    check(
        400,
        400,
        "Missing required node: state",
        call(
            Method::POST,
            &server.url("/api/v1/things/t/shadow"),
            Some(json!({"version":1})),
        )
        .await,
    );
    check(
        400,
        400,
        "nesting",
        call(
            Method::POST,
            &server.url("/api/v1/things/t/shadow"),
            Some(json!({"state":{"desired":{"a":{"b":{"c":{"d":{"e":{"f":{"g":1}}}}}}}}})),
        )
        .await,
    );
    check(
        400,
        400,
        "arrays must not contain null",
        call(
            Method::POST,
            &server.url("/api/v1/things/t/shadow"),
            Some(json!({"state":{"desired":{"a":[null]}}})),
        )
        .await,
    );
    // The state limit (8 KiB) is on the merged document, so build it up in bodies under 4 KiB.
    for (section, key) in [("desired", "a"), ("reported", "b")] {
        let (status, body) = call(
            Method::POST,
            &server.url("/api/v1/things/t/shadow"),
            Some(json!({"state":{section:{key:"x".repeat(3000)}}})),
        )
        .await;
        assert_eq!(status, 200, "{body}");
    }
    check(
        413,
        413,
        "maximum size allowed",
        call(
            Method::POST,
            &server.url("/api/v1/things/t/shadow"),
            Some(json!({"state":{"desired":{"c":"y".repeat(3000)}}})),
        )
        .await,
    );
    call(Method::DELETE, &server.url("/api/v1/things/t/shadow"), None).await;
    check(
        404,
        404,
        "Thing 'ghost' not found",
        call(
            Method::GET,
            &server.url("/api/v1/things/ghost/shadow"),
            None,
        )
        .await,
    );
    check(
        404,
        404,
        "No shadow exists",
        call(Method::GET, &server.url("/api/v1/things/t/shadow"), None).await,
    );
    check(
        400,
        400,
        "invalid thingName",
        call(
            Method::POST,
            &server.url("/api/v1/things"),
            Some(json!({"thingName":"a/b"})),
        )
        .await,
    );
    check(
        400,
        400,
        "unknown field",
        call(
            Method::POST,
            &server.url("/api/v1/things"),
            Some(json!({"thingNme":"x"})),
        )
        .await,
    );
    check(
        400,
        400,
        "accepts only state.reported",
        call(
            Method::POST,
            &server.url("/api/v1/thing-datas/shadow/reported"),
            Some(json!({"thingName":"t","state":{"desired":{"a":1}}})),
        )
        .await,
    );
    check(
        400,
        400,
        "thingName",
        call(
            Method::POST,
            &server.url("/api/v1/thing-datas/shadow/reported"),
            Some(json!({"state":{"reported":{"a":1}}})),
        )
        .await,
    );
    check(
        400,
        400,
        "limit",
        call(Method::GET, &server.url("/api/v1/things?limit=0"), None).await,
    );
    check(
        404,
        404,
        "no route",
        call(Method::GET, &server.url("/api/v1/nothing"), None).await,
    );

    let unauthenticated = client()
        .get(server.url("/api/v1/things"))
        .send()
        .await
        .expect("send");
    assert_eq!(unauthenticated.status(), 401);
    assert!(unauthenticated.headers().contains_key("www-authenticate"));
    let wrong = client()
        .get(server.url("/api/v1/things"))
        .basic_auth(common::ADMIN_KEY, Some("nope"))
        .send()
        .await
        .expect("send");
    assert_eq!(wrong.status(), 401);
    let bearer = client()
        .get(server.url("/api/v1/things"))
        .bearer_auth(format!("{}:{}", common::ADMIN_KEY, common::ADMIN_SECRET))
        .send()
        .await
        .expect("send");
    assert_eq!(bearer.status(), 200);

    // Still serving after all of that.
    let (status, _) = call(
        Method::POST,
        &server.url("/api/v1/things/t/shadow"),
        Some(json!({"state":{"desired":{"ok":true}}})),
    )
    .await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn listing_pages_with_a_cursor_and_deletes_keep_history() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), &[]);
    for name in ["d", "b", "e", "a", "c"] {
        let (status, _) = call(
            Method::POST,
            &server.url("/api/v1/things"),
            Some(json!({"thingName": name})),
        )
        .await;
        assert_eq!(status, 201);
    }
    let mut names = Vec::new();
    let mut url = server.url("/api/v1/things?limit=2");
    for _ in 0..10 {
        let (status, page) = call(Method::GET, &url, None).await;
        assert_eq!(status, 200);
        for item in page["items"].as_array().expect("items") {
            names.push(item["thingName"].as_str().expect("name").to_owned());
        }
        match page["nextCursor"].as_str() {
            Some(cursor) => url = server.url(&format!("/api/v1/things?limit=2&cursor={cursor}")),
            None => break,
        }
    }
    assert_eq!(names, ["a", "b", "c", "d", "e"]);

    call(
        Method::POST,
        &server.url("/api/v1/things/c/shadow"),
        Some(json!({"state":{"desired":{"x":1}}})),
    )
    .await;
    let (status, body) = call(Method::DELETE, &server.url("/api/v1/things/c/shadow"), None).await;
    assert_eq!((status, &body["version"]), (200, &json!(1)));
    let (status, _) = call(Method::GET, &server.url("/api/v1/things/c/shadow"), None).await;
    assert_eq!(status, 404);
    let (_, body) = call(
        Method::POST,
        &server.url("/api/v1/things/c/shadow"),
        Some(json!({"state":{"desired":{"x":2}}})),
    )
    .await;
    assert_eq!(body["version"], 2, "the version survives a shadow delete");

    let (status, _) = call(Method::DELETE, &server.url("/api/v1/things/c"), None).await;
    assert_eq!(status, 204);
    let (status, _) = call(Method::GET, &server.url("/api/v1/things/c"), None).await;
    assert_eq!(status, 404);
    // Its actor may still be running: an update reaches it and is refused there as unknown.
    let (status, body) = call(
        Method::POST,
        &server.url("/api/v1/things/c/shadow"),
        Some(json!({"state":{"desired":{"x":3}}})),
    )
    .await;
    assert_eq!(status, 404, "{body}");
    let (_, page) = call(Method::GET, &server.url("/api/v1/things"), None).await;
    assert_eq!(page["items"].as_array().expect("items").len(), 4);
    let (status, history) = call(Method::GET, &server.url("/api/v1/things/c/history"), None).await;
    assert_eq!(status, 200);
    let types: Vec<&str> = history["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|e| e["type"].as_str().expect("type"))
        .collect();
    assert_eq!(
        types,
        [
            "ThingRegistered",
            "ShadowUpdated",
            "ShadowDeleted",
            "ShadowUpdated",
            "ThingDeleted"
        ]
    );
}

#[tokio::test]
async fn metrics_are_served_as_json_and_prometheus_text_to_admins_only() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), &[]);
    let (status, _) = call(
        Method::POST,
        &server.url("/api/v1/things"),
        Some(json!({"thingName":"m1"})),
    )
    .await;
    assert_eq!(status, 201);
    let (status, metrics) = call(Method::GET, &server.url("/api/v1/metrics"), None).await;
    assert_eq!(status, 200);
    assert!(
        metrics["process"]["rssBytes"].as_u64().unwrap_or(0) > 0,
        "{metrics}"
    );
    assert!(
        metrics["things"]["activations"].as_u64().unwrap_or(0) >= 1,
        "{metrics}"
    );
    assert!(
        metrics["storage"]["durableWrites"].as_u64().unwrap_or(0) >= 1,
        "{metrics}"
    );
    assert_eq!(metrics["storage"]["logEpochs"], 1, "{metrics}");
    assert_eq!(metrics["storage"]["logEpochsUnsealed"], 1, "{metrics}");
    assert_eq!(metrics["storage"]["logEpochsPacked"], 0, "{metrics}");
    assert_eq!(metrics["mqtt"]["connections"], 0, "{metrics}");

    let response = common::client()
        .get(server.url("/metrics"))
        .basic_auth(common::ADMIN_KEY, Some(common::ADMIN_SECRET))
        .send()
        .await
        .expect("scrape");
    assert_eq!(response.status(), 200);
    assert!(response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/plain; version=0.0.4")));
    let text = response.text().await.expect("text");
    for line in [
        "# TYPE thinghub_things_active gauge",
        "# TYPE thinghub_thing_activations_total counter",
        "thinghub_mqtt_connections 0",
    ] {
        assert!(text.lines().any(|l| l == line), "missing {line}:\n{text}");
    }
    // Every sample line is `name value` with a number.
    for sample in text.lines().filter(|l| !l.starts_with('#')) {
        let (name, value) = sample.split_once(' ').expect("name value");
        assert!(name.starts_with("thinghub_"), "{sample}");
        value.parse::<f64>().expect("a number");
    }
    let anonymous = common::client()
        .get(server.url("/metrics"))
        .send()
        .await
        .expect("scrape");
    assert_eq!(anonymous.status(), 401);
}

#[tokio::test]
async fn bulk_registration_streams_ndjson_with_an_answer_per_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), &["--http-body-bytes-max", "4096"]);
    let mut body = String::new();
    for i in 0..50 {
        body.push_str(&format!(
            "{{\"thingName\":\"bulk-{i}\",\"thingType\":\"meter\"}}\n"
        ));
    }
    body.push_str("{\"thingName\":\"bulk-0\"}\n"); // line 51: exists
    body.push_str("not json\n"); // line 52
    body.push('\n'); // line 53, blank: no answer, but it counts (editors number it)
    body.push_str("{\"thingName\":\"bad name!\"}\n"); // line 54
    body.push_str(&format!(
        "{{\"thingName\":\"long\",\"thingType\":\"{}\"}}\n",
        "x".repeat(5000)
    )); // line 55: longer than the line bound
    body.push_str("{\"thingName\":\"taken\",\"password\":\"pw\"}\n"); // line 56: user exists
    body.push_str("{\"thingName\":\"no-pw\",\"password\":\"\"}\n"); // line 57: bad password
    body.push_str("{\"thingName\":\"bulk-dev\",\"password\":\"pw-1\"}"); // line 58, no final newline
    common::create(
        &server,
        "/api/v1/authentication/users",
        json!({"username":"taken","password":"pw"}),
    )
    .await;
    let response = client()
        .post(server.url("/api/v1/things/bulk"))
        .basic_auth(common::ADMIN_KEY, Some(common::ADMIN_SECRET))
        .body(body)
        .send()
        .await
        .expect("bulk");
    assert_eq!(response.status(), 200);
    let text = response.text().await.expect("ndjson");
    let answers: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("each answer is JSON"))
        .collect();
    let summary = answers.last().expect("summary");
    assert_eq!(
        summary["summary"],
        json!({"lines": 57, "created": 51, "failed": 6}),
        "{text}"
    );
    let by_line = |n: u64| {
        answers
            .iter()
            .find(|a| a["line"] == n)
            .unwrap_or_else(|| panic!("no answer for line {n}: {text}"))
    };
    assert_eq!(by_line(51)["code"], 409);
    assert_eq!(by_line(52)["code"], 400);
    assert!(
        answers.iter().all(|a| a["line"] != 53),
        "a blank line gets no answer"
    );
    assert_eq!(by_line(54)["code"], 400);
    assert_eq!(by_line(55)["code"], 413);
    // Credentials that cannot be created: an error, and no Thing left behind.
    assert_eq!(
        (
            by_line(56)["code"].clone(),
            by_line(56)["thingName"].clone()
        ),
        (json!(409), json!("taken"))
    );
    assert_eq!(by_line(57)["code"], 400);
    assert_eq!(by_line(58)["credentials"], "created");
    for absent in ["taken", "no-pw"] {
        let (status, _) = call(
            Method::GET,
            &server.url(&format!("/api/v1/things/{absent}")),
            None,
        )
        .await;
        assert_eq!(status, 404, "{absent} was not registered");
    }
    let (status, listed) = call(Method::GET, &server.url("/api/v1/things?limit=1000"), None).await;
    assert_eq!(status, 200);
    assert_eq!(listed["items"].as_array().map(Vec::len), Some(51));
    let (status, user) = call(
        Method::GET,
        &server.url("/api/v1/authentication/users/bulk-dev"),
        None,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(user["thingName"], "bulk-dev");
    // A Thing named "bulk" is still reachable.
    let (status, _) = call(
        Method::POST,
        &server.url("/api/v1/things"),
        Some(json!({"thingName":"bulk"})),
    )
    .await;
    assert_eq!(status, 201);
    let (status, thing) = call(Method::GET, &server.url("/api/v1/things/bulk"), None).await;
    assert_eq!((status, thing["thingName"].clone()), (200, json!("bulk")));
}

/// The names of a listing followed to its end (every page).
async fn all_names(server: &Server, query: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut url = server.url(&format!("/api/v1/things?limit=2&{query}"));
    for _ in 0..20 {
        let (status, page) = call(Method::GET, &url, None).await;
        assert_eq!(status, 200, "{query}: {page}");
        for item in page["items"].as_array().expect("items") {
            names.push(item["thingName"].as_str().expect("name").to_owned());
        }
        match page["nextCursor"].as_str() {
            Some(cursor) => {
                url = server.url(&format!("/api/v1/things?limit=2&{query}&cursor={cursor}"))
            }
            None => return names,
        }
    }
    panic!("{query}: the listing never ended");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listing_filters_by_name_prefix_type_group_and_online() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), &[]);
    for (name, kind) in [
        ("lamp", "lamp"),
        ("lamp-1", "lamp"),
        ("lamp-2", "lamp"),
        ("lamp-3", "spare"),
        ("lampshade", "lamp"),
        ("fan-1", "fan"),
        ("la", "lamp"),
    ] {
        common::create(
            &server,
            "/api/v1/things",
            json!({"thingName": name, "thingType": kind}),
        )
        .await;
    }
    common::register_device(&server, "lamp-9", "pw").await;
    common::create(
        &server,
        "/api/v1/thing-groups",
        json!({"groupName": "hall"}),
    )
    .await;
    for name in ["fan-1", "lamp-2", "lamp-9"] {
        common::create(
            &server,
            "/api/v1/thing-groups/hall/things",
            json!({"thingName": name}),
        )
        .await;
    }
    let (_device, _) =
        common::device::Device::connect(&server, "lamp-9", ("lamp-9", "pw"), true).await;

    // A prefix starts at the name equal to it and stops past the last name with it.
    assert_eq!(
        all_names(&server, "prefix=lamp").await,
        ["lamp", "lamp-1", "lamp-2", "lamp-3", "lamp-9", "lampshade"]
    );
    assert_eq!(all_names(&server, "prefix=lamp-").await.len(), 4);
    assert!(all_names(&server, "prefix=zz").await.is_empty());
    assert_eq!(
        all_names(&server, "prefix=lamp&thingType=lamp").await,
        ["lamp", "lamp-1", "lamp-2", "lampshade"]
    );
    assert_eq!(
        all_names(&server, "thingGroup=hall").await,
        ["fan-1", "lamp-2", "lamp-9"]
    );
    assert_eq!(
        all_names(&server, "thingGroup=hall&prefix=lamp").await,
        ["lamp-2", "lamp-9"]
    );
    assert_eq!(all_names(&server, "online=true").await, ["lamp-9"]);
    assert_eq!(all_names(&server, "online=false").await.len(), 7);
    let (_, page) = call(
        Method::GET,
        &server.url("/api/v1/things?prefix=lamp-9"),
        None,
    )
    .await;
    assert_eq!(page["items"][0]["online"], true);

    for (query, status) in [
        ("thingGroup=nope", 404),
        ("online=maybe", 400),
        ("colour=red", 400),
    ] {
        let (got, body) = call(
            Method::GET,
            &server.url(&format!("/api/v1/things?{query}")),
            None,
        )
        .await;
        assert_eq!(got, status, "{query}: {body}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_reads_newest_first_filtered_by_type() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), &[]);
    common::create(&server, "/api/v1/things", json!({"thingName": "t"})).await;
    for i in 0..5 {
        let (status, _) = call(
            Method::POST,
            &server.url("/api/v1/things/t/shadow"),
            Some(json!({"state": {"desired": {"i": i}}})),
        )
        .await;
        assert_eq!(status, 200);
    }
    let (status, _) = call(
        Method::POST,
        &server.url("/api/v1/things/t/commands"),
        Some(json!({"action": "blink"})),
    )
    .await;
    assert_eq!(status, 201);

    let seqs = |page: &serde_json::Value| -> Vec<u64> {
        page["items"]
            .as_array()
            .expect("items")
            .iter()
            .map(|e| e["seq"].as_u64().expect("seq"))
            .collect()
    };
    let (_, page) = call(
        Method::GET,
        &server.url("/api/v1/things/t/history?order=newest&limit=3"),
        None,
    )
    .await;
    assert_eq!(seqs(&page), [7, 6, 5]);
    assert_eq!(page["items"][0]["type"], "CommandSent");
    let before = page["nextBeforeSeq"].as_u64().expect("a next page");
    let (_, page) = call(
        Method::GET,
        &server.url(&format!(
            "/api/v1/things/t/history?order=newest&limit=10&beforeSeq={before}"
        )),
        None,
    )
    .await;
    assert_eq!(seqs(&page), [4, 3, 2, 1]);
    assert!(page["nextBeforeSeq"].is_null());
    // A page that ends exactly at the first entry has no next page either.
    let (_, page) = call(
        Method::GET,
        &server.url("/api/v1/things/t/history?order=newest&limit=4&beforeSeq=5"),
        None,
    )
    .await;
    assert_eq!(seqs(&page), [4, 3, 2, 1]);
    assert!(page["nextBeforeSeq"].is_null(), "{page}");

    let (_, page) = call(
        Method::GET,
        &server.url("/api/v1/things/t/history?order=newest&type=ShadowUpdated&limit=2"),
        None,
    )
    .await;
    assert_eq!(seqs(&page), [6, 5]);
    let (_, page) = call(
        Method::GET,
        &server.url("/api/v1/things/t/history?order=newest&type=JobQueued"),
        None,
    )
    .await;
    assert_eq!(seqs(&page), Vec::<u64>::new());

    // Mixing the two ways of paging is refused, as is an unknown order.
    // A Thing with no log is a 404 whatever the filter; an unknown type is a 400.
    let (status, _) = call(
        Method::GET,
        &server.url("/api/v1/things/nope/history?order=newest&type=ShadowUpdated"),
        None,
    )
    .await;
    assert_eq!(status, 404);
    for query in [
        "order=newest&fromSeq=2",
        "beforeSeq=3",
        "type=ShadowUpdated",
        "order=sideways",
        "order=newest&type=Shadowupdated",
    ] {
        let (status, body) = call(
            Method::GET,
            &server.url(&format!("/api/v1/things/t/history?{query}")),
            None,
        )
        .await;
        assert_eq!(status, 400, "{query}: {body}");
    }
}
